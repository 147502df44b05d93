"""DDIM inversion and sampling against diffusers' own schedulers, and invert-then-regenerate
on a model whose eps is known in closed form."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from helpers import random_images

from ctrak.errors import ConfigError
from ctrak.inversion import check_on_grid, ddim_invert, ddim_sample, guided_eps, trailing_grid


@pytest.mark.parametrize("steps", [10, 50])
def test_grid_is_diffusers_trailing_grid(steps, pixel_model_dir):
    sched = DDIMInverseScheduler.from_pretrained(
        pixel_model_dir, subfolder="scheduler", timestep_spacing="trailing"
    )
    sched.set_timesteps(steps)
    assert trailing_grid(steps) == sched.timesteps.tolist()
    assert {99, 499, 899} <= set(trailing_grid(steps))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_inversion_matches_ddim_inverse_scheduler(guidance, latent_model64, latent_model_dir):
    model, steps = latent_model64, 10
    x0 = model.images_to_x0(random_images(2, seed=5, dtype=torch.float64))
    cond = model.encode_prompts(["a red triangle", "a blue circle"])
    eps_fn = guided_eps(model.eps, cond, model.null_condition(2), guidance)
    ours = ddim_invert(eps_fn, x0, model.alphas_cumprod, steps, keep=trailing_grid(steps))

    sched = DDIMInverseScheduler.from_pretrained(
        latent_model_dir, subfolder="scheduler", timestep_spacing="trailing", set_alpha_to_one=True
    )
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    x = x0
    for t in sched.timesteps:
        x = sched.step(eps_fn(x, int(t)), int(t), x).prev_sample
        torch.testing.assert_close(ours[int(t)], x, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("clip", [False, True])
def test_sampling_matches_ddim_scheduler(clip, pixel_model64, pixel_model_dir):
    model, steps = pixel_model64, 10
    cond = model.encode_prompts(["a red triangle"])
    eps_fn = guided_eps(model.eps, cond, model.null_condition(1), 3.0)
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours, states = ddim_sample(
        eps_fn, x_T, model.alphas_cumprod, steps, keep=(99, 499), clip_x0=1.0 if clip else None
    )

    sched = DDIMScheduler.from_pretrained(
        pixel_model_dir,
        subfolder="scheduler",
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=clip,
    )
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    x = x_T
    for t in sched.timesteps:
        if int(t) in states:
            torch.testing.assert_close(states[int(t)], x)
        x = sched.step(eps_fn(x, int(t)), int(t), x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


def _gaussian_eps(mu: torch.Tensor, s2: float, alphas_cumprod: torch.Tensor):
    """Exact eps for data x0 ~ N(mu, s2 I): eps = sqrt(1-a)(x - sqrt(a) mu) / (a s2 + 1 - a)."""

    def eps_fn(x, t):
        a = float(alphas_cumprod[t])
        return (1 - a) ** 0.5 * (x - a**0.5 * mu) / (a * s2 + 1 - a)

    return eps_fn


def test_invert_then_regenerate_recovers_x0_on_analytic_model(pixel_model64):
    abar = pixel_model64.alphas_cumprod
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    x0 = mu + 0.5 * torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    eps_fn = _gaussian_eps(mu, 0.25, abar)
    errors = []
    for steps in (10, 50, 250):
        x_t = ddim_invert(eps_fn, x0, abar, steps, keep=[899])[899]
        recovered, _ = ddim_sample(eps_fn, x_t, abar, steps, start=899)
        errors.append(float((recovered - x0).abs().max() / x0.abs().max()))
    # first order in the step (eps is read at the next timestep, as diffusers does)
    # refining the grid 5x cuts the error ~5x: it converges to exact recovery
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    assert errors[2] < 1e-2, errors


def test_off_grid_timestep_is_refused():
    with pytest.raises(ConfigError, match="not on the 10-step"):
        check_on_grid([100], 10, 1000)
