"""The benchmark's models and images.

- toy: `ctrak/assets/toy-paper` (the trained toy model) when present, else a random-weight
  `ctrak.toy.tiny.build_tiny_model` of the same layout; attributed through all parameters.
- SD-shaped: a UNet2DConditionModel with Stable Diffusion 1.x's block layout
  (CrossAttnDownBlock2D x 3 + DownBlock2D, a cross-attention mid block, UpBlock2D +
  CrossAttnUpBlock2D x 3, two layers per block, 8 heads, GroupNorm(32), 4 latent channels) with
  channels scaled down to fit a CPU, random weights; attributed through `attn2` parameters.
  Tokenizer, text encoder, scheduler and a 2x VAE come from `ctrak.toy.tiny.build_tiny_model`.

Images are the synthetic paper world's training images (`ctrak.toy.worlds.sample_row`),
drawn at each model's image size: image i is combination i mod 3, so any prefix is balanced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctrak.toy import DEFAULT_MODEL

TOY_ASSET = DEFAULT_MODEL
WORLD, SPLIT, WORLD_SEED = "paper", "train", 0


@dataclass(frozen=True)
class ModelSpec:
    """A model directory, the parameters attributed through and where it came from."""

    name: str
    path: Path
    params: tuple[str, ...]
    description: str
    trained: bool = True  # False: random weights, so Precision@10 is chance


def toy_model(workdir: Path, path: str | None, quick: bool) -> ModelSpec:
    """The toy model: `path`, else the shipped asset, else a random-weight tiny model
    (16 px, channels (16, 32) with --quick; 24 px, channels (16, 32, 64) otherwise: the layout
    `ctrak train-toy` trains)."""
    from ctrak.toy.tiny import build_tiny_model

    if path:
        return ModelSpec("toy", Path(path), (), f"toy model {path} (all parameters)")
    if TOY_ASSET.is_dir() and not quick:
        return ModelSpec("toy", TOY_ASSET, (), f"{TOY_ASSET.name} (trained; all parameters)")
    if quick:
        out = build_tiny_model(workdir / "toy-tiny", image_size=16, seed=0)
        what = "random-weight tiny model, 16 px, channels (16, 32)"
    else:
        out = build_tiny_model(
            workdir / "toy-tiny",
            image_size=24,
            block_out_channels=(16, 32, 64),
            text_dim=64,
            seed=0,
        )
        what = "random-weight tiny model, 24 px, channels (16, 32, 64)"
    reason = "--quick" if quick else f"{TOY_ASSET} absent"
    return ModelSpec("toy", out, (), f"{what} ({reason}; all parameters)", trained=False)


def sd_shaped_model(
    workdir: Path,
    *,
    latent_size: int = 16,
    block_out_channels: Sequence[int] = (32, 64, 128, 128),
    cross_attention_dim: int = 128,
    layers_per_block: int = 2,
    max_length: int = 8,
    seed: int = 0,
) -> ModelSpec:
    """Write the SD-shaped model (latent `latent_size`^2, image 2x that) and describe it."""
    from diffusers import UNet2DConditionModel

    from ctrak.toy.tiny import build_tiny_model

    path = build_tiny_model(
        workdir / "sd-shaped",
        latent=True,
        image_size=2 * latent_size,
        text_dim=cross_attention_dim,
        max_length=max_length,
        seed=seed,
    )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    unet.save_pretrained(path / "unet", safe_serialization=True)
    total = sum(p.numel() for p in unet.parameters())
    attn2 = sum(p.numel() for n, p in unet.named_parameters() if "attn2" in n)
    what = (
        f"SD 1.x layout, channels {tuple(block_out_channels)}, latent {latent_size}x"
        f"{latent_size}, cross-attention dim {cross_attention_dim}, random weights; "
        f"attn2 = {attn2:,} of {total:,} parameters"
    )
    return ModelSpec("sd", path, ("attn2",), what, trained=False)


def world_images(
    start: int, count: int, image_size: int
) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Training images start..start+count-1 of the paper world:
    ((count, 3, S, S) in [-1, 1], captions, labels {shape, colour, ...})."""
    from ctrak.toy.worlds import caption, sample_row

    arrays, captions, labels = [], [], []
    for i in range(start, start + count):
        array, label = sample_row(WORLD, SPLIT, i, image_size, WORLD_SEED)
        arrays.append(array)
        captions.append(caption(label["shape"], label["colour"]))
        labels.append(label)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, captions, labels
