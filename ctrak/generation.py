"""Sampling images from the model under a prompt (DDIM, eta = 0, classifier-free guidance).

Used by `ctrak generate`, by global-scope queries (the model's own draws, whose x_t are then
taken by DDIM inversion like the training side's) and by the benchmark's generated query
images. Initial noise comes from a derived seed per draw, so draw i is the same image whatever
the batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ctrak.inversion import ddim_sample, guided_eps
from ctrak.model import DiffusionModel
from ctrak.seeds import generator


def initial_noise(model: DiffusionModel, seed: int, draws: Sequence[int]) -> torch.Tensor:
    """x_T for the given draw indices: (len(draws), C, h, w) float32 on the model's device."""
    cfg = model.unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    noise = [torch.randn(shape, generator=generator(seed, "draw", i)) for i in draws]
    return torch.stack(noise).to(model.device)


@torch.no_grad()
def sample(
    model: DiffusionModel,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    first_draw: int = 0,
    num_steps: int = 50,
    guidance: float = 3.0,
    negative: str = "",
    guide_t: tuple[int, int] | None = None,
) -> torch.Tensor:
    """prompts (B,) -> x0 (B, C, h, w) float32.

    Draw b uses initial noise `first_draw + b`; x0 is in model space (latent or pixel). The
    DDIM arithmetic runs in float64: at abar ~ 0 (the first steps of a pixel schedule) the
    Tweedie estimate divides by sqrt(abar) ~ 5e-5 and float32 trajectories drift visibly.
    Guidance runs against `negative` ("" = the null condition, plain CFG); with the prompt
    minus one concept it follows that concept's slider eps(c) - eps(c-), the query direction
    of Concept-TRAK, so `guidance` > 1 shows what the slider adds. `guide_t = (lo, hi)` guides
    only at the sampling steps with lo <= t <= hi and draws the prompt alone (w = 1) at the
    others: where in the noise range the guidance acts."""
    cond = model.encode_prompts(prompts)
    uncond = model.encode_prompts([negative], allow_empty=True).expand(len(prompts), -1, -1)
    x_T = initial_noise(model, seed, range(first_draw, first_draw + len(prompts))).double()
    eps_fn = guided_eps(model.eps, cond, uncond, guidance)
    if guide_t is not None:
        lo, hi = guide_t
        guided, plain = eps_fn, guided_eps(model.eps, cond, None, 1.0)
        eps_fn = lambda x, t: guided(x, t) if lo <= t <= hi else plain(x, t)  # noqa: E731
    x0, _ = ddim_sample(eps_fn, x_T, model.alphas_cumprod, num_steps, clip_x0=model.clip_x0)
    return x0.float()


def generate_images(
    model: DiffusionModel,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    num_steps: int = 50,
    guidance: float = 3.0,
    negative: str = "",
) -> torch.Tensor:
    """prompts (B,) -> images (B, 3, H, W) in [-1, 1] (see `sample`)."""
    x0 = sample(
        model, prompts, seed=seed, num_steps=num_steps, guidance=guidance, negative=negative
    )
    return model.x0_to_images(x0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()
