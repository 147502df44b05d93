"""A prepared accelerator run of the default featurize path on a full-size UNet.

`ctrak bench --device cuda --model-config sd15`: Stable Diffusion 1.5's UNet layout
(block_out_channels 320/640/1280/1280, two layers per block, 8 heads, cross-attention dim
768, 64 x 64 latents, 77 text tokens; about 860M parameters, attn2 about 20M of them
attributed) with random weights, a tiny text encoder and 2x VAE (`ctrak.toy`, their cost is
not the UNet's), the synthetic world's images at 128 px. For each dtype (bfloat16 and
float32): the default path's seconds and samples per second, FE per sample (analytic and
counted by hooks), the batched no-grad forward and efficiency, and the peak accelerator
memory. Sized for one H100 in well under 8 minutes (16 samples per dtype, batch 8); the
naive reference is not run here (its dense JL over the attn2 gradient is regenerated per
batch: minutes per batch at this size).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ctrak.attribution import Attributor
from ctrak.model import DiffusionModel
from pipeline.bench import models, speed
from pipeline.bench.report import Row

MODEL_CONFIGS: dict[str, dict] = {
    "sd15": {
        "latent_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "cross_attention_dim": 768,
        "max_length": 77,
    },
    "sd-shaped": {"latent_size": 16, "block_out_channels": (32, 64, 128, 128)},
    "tiny": {"latent_size": 8, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32},
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def measure_dtype(
    model: DiffusionModel, params: tuple[str, ...], samples: int, batch_size: int
) -> dict[str, object]:
    """The default path on `samples` world images: seconds, FE, forward, efficiency, memory."""
    device = model.device
    images, captions, _ = models.world_images(0, samples, model.image_size)
    images = images.to(device)
    attributor = Attributor(model, speed.default_config(params))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # 1. warm-up on two images, counting UNet passes
    with speed.PassCounter(model.unet) as counter:
        attributor.featurize_batch(images[:2], captions[:2])
    _sync(device)
    # 2. the timed batches, each synchronised
    seconds = []
    for start in range(0, samples, batch_size):
        begin = time.perf_counter()
        phi, ok = attributor.featurize_batch(
            images[start : start + batch_size], captions[start : start + batch_size]
        )
        _sync(device)
        seconds.append(time.perf_counter() - begin)
        assert bool(ok.all()) and bool(torch.isfinite(phi).all()), "a rejected row"
    # 3. the batched no-grad forward it is measured against
    head = slice(0, min(batch_size, samples))
    forward = speed.ForwardTimer(model, images[head], captions[head])
    forward.measure(5)
    s_per_sample = sum(seconds) / samples
    fe = speed.analytic_fe(attributor.config, model.num_train_timesteps)["total"]
    return {
        "samples": samples,
        "batch_size": batch_size,
        "s_per_sample": s_per_sample,
        "samples_per_s": 1 / s_per_sample,
        "batch_seconds": seconds,
        "fe_analytic": fe,
        "fe_counted": counter.fe_per_sample(2),
        "forward_s_per_sample": forward.s_per_sample,
        "efficiency": fe * forward.s_per_sample / s_per_sample,
        "peak_memory_bytes": _peak_bytes(device),
        "num_params": sum(p.numel() for p in model.unet.parameters()),
        "attributed_params": sum(p.numel() for p in attributor.params.values()),
    }


def run_device(workdir: Path, opts: dict) -> tuple[dict, list[Row], str]:
    """Build the `opts["model_config"]` UNet once, then measure each dtype on opts["device"]."""
    spec = models.sd_shaped_model(workdir, **MODEL_CONFIGS[opts["model_config"]])
    device = torch.device(opts["device"])
    results: dict[str, object] = {"device": str(device), "model_config": opts["model_config"]}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    rows: list[Row] = []
    for name in opts["dtypes"]:
        model = DiffusionModel.load(spec.path, device=device, dtype=DTYPES[name])
        r = measure_dtype(model, spec.params, opts["device_samples"], opts["batch_size"])
        results[name] = r
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        section = f"{opts['model_config']} {name} on {device.type}"
        peak = r["peak_memory_bytes"]
        rows += [
            Row(section, "default path samples/s", r["samples_per_s"], "1/s"),
            Row(section, "default path s/sample", r["s_per_sample"], "s"),
            Row(section, "FE per sample, analytic", r["fe_analytic"], "fwd"),
            Row(section, "FE per sample, counted by hooks", r["fe_counted"], "fwd", 18, "<="),
            Row(section, "batched forward s/sample", r["forward_s_per_sample"], "s"),
            Row(section, "efficiency FE*fwd / s_per_sample", r["efficiency"], "", 0.8),
            Row(
                section,
                "peak accelerator memory",
                float("nan") if peak is None else peak / 2**30,
                "GiB",
                note="torch.cuda.max_memory_allocated" if peak is not None else "not on cuda",
            ),
        ]
    return results, rows, spec.description
