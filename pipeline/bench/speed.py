"""Seconds per training sample of the naive reference and of the default path, and how close
the default path is to what the network itself costs.

- naive: `ProjectionConfig(path="exact", k=naive_k)` (torch.func full per-sample gradients,
  dense JL projection regenerated for every batch: a `Projector` with `cache_bytes=0`) and
  the reference inversion (50 steps, CFG 7.5, DDIMInverseScheduler's convention), timesteps
  99..899, the exact DPS direction;
- default: `AttributionConfig()` (factored projection, 10-step unguided inversion, and the
  default DPS direction, inversion convention and timesteps: docs/cost-defaults.md).

Forward-equivalents per sample (FE), a backward counted as two forwards:

    FE = n_inv * (2 if guided else 1) + |timesteps| * per_timestep

with n_inv the inversion grid steps up to the largest timestep, and per timestep, as the
engine runs it: factored path 1 + 2 + 2 (one forward shared by the DPS direction and the
parameter gradient; a backward to x_t for v, a backward to the layer outputs for 2v), 1 + 2
with dps="approx" (no backward to x_t); exact path (1 + 2) + (1 + 2) (DPS forward and
backward, then torch.func forward and backward), 1 + (1 + 2) with dps="approx". When the
gradients share the inversion's forwards (`ctrak.shared.shares_forward`), each timestep's
forward is an inversion step's, and the largest timestep's adds one:

    FE = n_inv + 1 + |timesteps| * (per_timestep - 1).
`PassCounter` counts the same from hooks on the UNet (samples through each forward and each
backward through its output).

    efficiency = FE * (batched no-grad forward seconds per sample) / (seconds per sample)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ctrak.attribution import Attributor, parameter_layout
from ctrak.config import (
    DEFAULT_TIMESTEPS,
    AttributionConfig,
    GradientConfig,
    InversionConfig,
    ProjectionConfig,
)
from ctrak.errors import NumericsError
from ctrak.inversion import trailing_grid
from ctrak.model import DiffusionModel
from ctrak.projection import Projector
from ctrak.shared import shares_forward

REFERENCE_INVERSION = InversionConfig(num_steps=50, guidance=7.5, eps_at="next")


def default_config(params: tuple[str, ...], **projection) -> AttributionConfig:
    """The project's default path over `params` (`projection`: ProjectionConfig overrides)."""
    return AttributionConfig(
        gradient=GradientConfig(params=params), projection=ProjectionConfig(**projection)
    )


def naive_config(params: tuple[str, ...], k: int) -> AttributionConfig:
    """The reference settings: exact per-sample gradients, dense JL to k, 50-step CFG 7.5."""
    return AttributionConfig(
        gradient=GradientConfig(params=params, timesteps=DEFAULT_TIMESTEPS, dps="exact"),
        inversion=REFERENCE_INVERSION,
        projection=ProjectionConfig(path="exact", k=k),
    )


def naive_attributor(model: DiffusionModel, params: tuple[str, ...], k: int) -> Attributor:
    """The naive reference: its dense projection is regenerated for every batch."""
    config = naive_config(params, k)
    p = config.projection
    projector = Projector(parameter_layout(model, config), p.k, p.seed, p.kind, cache_bytes=0)
    return Attributor(model, config, projector=projector)


def analytic_fe(config: AttributionConfig, num_train_timesteps: int) -> dict[str, float]:
    """Forward-equivalents per training sample from the configuration (see module doc)."""
    g, inv = config.gradient, config.inversion
    timesteps = g.timesteps
    inversion = 0
    if g.resolved_state == "inverted":
        last = max(timesteps)
        steps = sum(1 for t in trailing_grid(inv.num_steps, num_train_timesteps) if t <= last)
        inversion = steps * (2 if inv.guidance != 1.0 else 1)
    to_x = 2 if g.dps == "exact" else 0  # the backward to x_t for the DPS direction
    if g.method != "concept-trak":
        per_timestep = 1 + 2  # forward, backward
    elif config.projection.path == "factored":
        per_timestep = 1 + to_x + 2  # one forward; backward to x_t (v), to the layers (2v)
    else:
        per_timestep = (1 + to_x) + (1 + 2)  # DPS forward (+ backward); vmap forward + backward
    shared = shares_forward(config)
    if shared:  # each timestep's forward is an inversion step's; the largest adds one
        total = inversion + 1 + len(timesteps) * (per_timestep - 1)
    else:
        total = inversion + len(timesteps) * per_timestep
    return {
        "inversion": inversion,
        "per_timestep": per_timestep,
        "shared": shared,
        "total": total,
    }


@dataclass
class PassCounter:
    """Counts samples through the UNet: each forward call adds its batch size, each backward
    through its output adds the batch size of the incoming gradient."""

    unet: torch.nn.Module
    forward_samples: int = 0
    backward_samples: int = 0
    _handle: object = field(default=None, repr=False)

    def __enter__(self) -> PassCounter:
        def count_backward(grad: torch.Tensor) -> None:
            self.backward_samples += int(grad.shape[0])

        def hook(module, args, output) -> None:
            self.forward_samples += int(args[0].shape[0])
            sample = output[0] if isinstance(output, tuple) else output.sample
            if sample.requires_grad:
                sample.register_hook(count_backward)

        self._handle = self.unet.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def fe_per_sample(self, samples: int) -> float:
        return (self.forward_samples + 2 * self.backward_samples) / samples


def featurize_timed(
    attributor: Attributor,
    images: torch.Tensor,
    captions: list[str],
    batch_size: int,
    between: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Stream images through `featurize_batch`: (features (n, k), seconds per batch).
    `between` runs, untimed, after every batch."""
    parts, seconds = [], []
    for start in range(0, images.shape[0], batch_size):
        stop = start + batch_size
        begin = time.perf_counter()
        phi, ok = attributor.featurize_batch(images[start:stop], captions[start:stop])
        seconds.append(time.perf_counter() - begin)
        if not ok.all():
            raise NumericsError(f"benchmark batch at {start} has rejected rows: {ok.tolist()}")
        parts.append(phi)
        if between is not None:
            between()
    return torch.cat(parts), seconds


class ForwardTimer:
    """Seconds per sample of one batched no-grad eps forward on fixed inputs (a batch of
    noised states at t = 499 under the batch's captions)."""

    def __init__(self, model: DiffusionModel, images: torch.Tensor, captions: list[str]) -> None:
        self.model = model
        x0 = model.images_to_x0(images)
        gen = torch.Generator().manual_seed(0)
        self.x_t = torch.randn(x0.shape, generator=gen).to(x0.device)
        self.cond = model.encode_prompts(captions)
        self.times: list[float] = []
        self.measure(2)  # warm-up
        self.times.clear()

    @torch.no_grad()
    def measure(self, reps: int) -> None:
        for _ in range(reps):
            begin = time.perf_counter()
            self.model.eps(self.x_t, 499, self.cond)
            if self.x_t.device.type == "cuda":
                torch.cuda.synchronize(self.x_t.device)
            self.times.append((time.perf_counter() - begin) / self.x_t.shape[0])

    @property
    def s_per_sample(self) -> float:
        return statistics.fmean(self.times)


def measure_speed(
    model: DiffusionModel,
    params: tuple[str, ...],
    images: torch.Tensor,
    captions: list[str],
    *,
    batch_size: int,
    naive_samples: int,
    naive_k: int,
    forward_reps: int,
) -> tuple[dict[str, object], torch.Tensor, torch.Tensor]:
    """Time both paths on the same images -> (results, default-path features (n, k),
    naive-path features of the first naive_samples (naive_samples, naive_k)).

    The default path runs over all `images` (after an untimed warm-up on two of them, in which
    the UNet passes are counted); the naive path over the first `naive_samples`."""
    T = model.num_train_timesteps
    default = Attributor(model, default_config(params))
    head, warm = slice(0, batch_size), min(2, images.shape[0])
    # 1. warm-up (builds the projection caches), counting UNet passes
    with PassCounter(model.unet) as counter:
        default.featurize_batch(images[:warm], captions[:warm])
    counted = counter.fe_per_sample(warm)
    # 2. the default path, the forward cost timed after every batch (the machine is shared:
    #    both are sampled under the same load)
    forward = ForwardTimer(model, images[head], captions[head])
    features, seconds = featurize_timed(
        default, images, captions, batch_size, lambda: forward.measure(forward_reps)
    )
    fwd = forward.s_per_sample
    default_s = sum(seconds) / images.shape[0]
    # 3. the naive reference on the first naive_samples of the same images
    naive = naive_attributor(model, params, naive_k)
    naive_features, naive_seconds = featurize_timed(
        naive, images[:naive_samples], captions[:naive_samples], batch_size
    )
    naive_s = sum(naive_seconds) / naive_samples
    fe = analytic_fe(default.config, T)
    results: dict[str, object] = {
        "params": list(params) or "all",
        "num_params": sum(p.numel() for p in default.params.values()),
        "batch_size": batch_size,
        "default": {
            "config": default.config.provenance(),
            "samples": int(images.shape[0]),
            "s_per_sample": default_s,
            "batch_seconds": seconds,
            "fe_analytic": fe,
            "fe_counted": counted,
        },
        "naive": {
            "config": naive.config.provenance(),
            "samples": naive_samples,
            "s_per_sample": naive_s,
            "batch_seconds": naive_seconds,
            "fe_analytic": analytic_fe(naive.config, T),
            "projection_cache_bytes": 0,
        },
        "speedup": naive_s / default_s,
        "forward_s_per_sample": fwd,
        "forward_s_per_sample_samples": forward.times,
        "efficiency": fe["total"] * fwd / default_s,
        "fe_measured": default_s / fwd,
    }
    return results, features, naive_features
