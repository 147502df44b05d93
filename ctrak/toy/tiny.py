"""Tiny diffusers-format models built from config (tests, the toy benchmark, laptops).

`build_tiny_model` writes the Stable-Diffusion layout - UNet2DConditionModel, CLIPTextModel,
a tokenizer, a DDPM scheduler config and optionally an AutoencoderKL - with random weights,
so the whole pipeline runs without fetching anything. The tokenizer is word-level over a small
vocabulary (unknown words map to [UNK]); the empty prompt is BOS + EOS, the null condition.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "<|startoftext|>", "<|endoftext|>")
DEFAULT_WORDS = (
    *("a", "an", "the", "of", "in", "on", "with", "and", "style", "photo", "drawing"),
    *("painting", "picture", "shape"),
    *("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "cyan", "magenta"),
    *("triangle", "circle", "square", "star", "cross", "diamond", "pentagon", "hexagon"),
)


def build_tokenizer(words: Sequence[str] = DEFAULT_WORDS, max_length: int = 8):
    """A word-level PreTrainedTokenizerFast that adds BOS/EOS and pads with [PAD]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *dict.fromkeys(words)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
    )


def build_tiny_model(
    path: str | Path,
    *,
    latent: bool = False,
    image_size: int = 16,
    block_out_channels: Sequence[int] = (16, 32),
    layers_per_block: int = 1,
    text_dim: int = 32,
    text_layers: int = 1,
    words: Sequence[str] = DEFAULT_WORDS,
    max_length: int = 8,
    beta_schedule: str = "squaredcos_cap_v2",
    seed: int = 0,
) -> Path:
    """Write a tiny text-to-image model directory and return its path.

    latent=True adds an AutoencoderKL with a 2x downsampling factor (4 latent channels) and
    uses the SD scheduler (scaled_linear); otherwise the UNet works on RGB pixels.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=text_layers,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    channels = 4 if latent else 3
    sample_size = image_size // 2 if latent else image_size
    n_blocks = len(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n_blocks - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_blocks - 1),
        cross_attention_dim=text_dim,
        attention_head_dim=max(block_out_channels[0] // 4, 1),
        norm_num_groups=min(8, block_out_channels[0]),
    )
    index = {
        "_class_name": "StableDiffusionPipeline" if latent else "CtrakPixelPipeline",
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
    }
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear" if latent else beta_schedule,
        beta_start=0.00085 if latent else 0.0001,
        beta_end=0.012 if latent else 0.02,
        clip_sample=False,
        prediction_type="epsilon",
    )
    if latent:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            latent_channels=4,
            norm_num_groups=4,
            sample_size=image_size,
        )
        vae.save_pretrained(path / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    unet.save_pretrained(path / "unet", safe_serialization=True)
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(path / "tokenizer")
    scheduler.save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
