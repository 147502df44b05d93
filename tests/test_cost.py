"""The cost levers of issue 19 against independent references: the DPS direction without the
network Jacobian, the inversion convention whose forwards the gradients share, and the
forward-equivalent accounting (analytic == counted by hooks)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from helpers import random_images

from ctrak.attribution import Attributor
from ctrak.config import AttributionConfig, GradientConfig, InversionConfig, ProjectionConfig
from ctrak.errors import ConfigError
from ctrak.inversion import ddim_invert, ddim_sample, trailing_grid
from ctrak.losses import TRAINING_LOSSES, dps_approx_loss, dps_direction_approx, dps_loss
from ctrak.shared import shares_forward
from pipeline.bench.speed import PassCounter, analytic_fe

CAPTIONS = ["a red triangle", "a blue circle", "a red circle"]


def _config(**kw) -> AttributionConfig:
    inv = {k: kw.pop(k) for k in ("eps_at", "guidance", "num_steps") if k in kw}
    path = kw.pop("path", "factored")
    return AttributionConfig(
        gradient=GradientConfig(params=kw.pop("params", ("attn2",)), **kw),
        inversion=InversionConfig(**inv),
        projection=ProjectionConfig(k=64, path=path),
    )


def test_approx_dps_direction_is_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    x_t, x0, eps = (torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) for _ in "abc")
    abar_t = 0.37
    v = dps_direction_approx(eps, x_t, x0, abar_t)
    # 1. autograd of ||x0_hat - x0||^2 with eps held constant (the Jacobian dropped)
    x = x_t.clone().requires_grad_(True)
    x0_hat = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    ((x0_hat - x0).pow(2).sum()).backward()
    torch.testing.assert_close(v, -x.grad, rtol=1e-12, atol=1e-12)
    # 2. the same in noise terms: 2 sqrt(1 - abar) / abar (eps - noise), noise implied by x_t
    noise = (x_t - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
    torch.testing.assert_close(v, 2 * (1 - abar_t) ** 0.5 / abar_t * (eps - noise))


@pytest.mark.parametrize("path", ["factored", "exact"])
def test_approx_dps_gradient_is_the_normalised_denoising_gradient(path, pixel_model64):
    """After the per-timestep normalisation, approximate DPS = the denoising (TRAK) loss's
    gradient at the same inverted states with their implied noise (a separate loss code path);
    the exact DPS direction is not."""
    model = pixel_model64
    attributor = Attributor(model, _config(timesteps=(299, 599), path=path, params=()))
    x0 = model.images_to_x0(random_images(3, seed=2, dtype=torch.float64))
    cond = model.encode_prompts(CAPTIONS)
    states = attributor.states(x0, cond)
    approx, ok = attributor._summed_gradients(states, x0, cond, dps_approx_loss)
    dsm, _ = attributor._summed_gradients(states, x0, cond, TRAINING_LOSSES["trak"])
    exact, _ = attributor._summed_gradients(states, x0, cond, dps_loss)
    assert ok.all()
    torch.testing.assert_close(approx, dsm, rtol=1e-8, atol=1e-10)
    assert (exact - approx).norm() > 1e-3 * approx.norm()


def test_exact_dps_is_the_default_and_its_provenance_is_unchanged(pixel_model64):
    """dps="exact", eps_at="next" add nothing to the provenance (stores from before stay
    valid); the new options do."""
    old = _config(dps="exact", eps_at="next").provenance()
    assert "dps" not in old and "inversion_eps_at" not in old
    new = _config(dps="approx", eps_at="current").provenance()
    assert new["dps"] == "approx" and new["inversion_eps_at"] == "current"
    a = Attributor(pixel_model64, _config(dps="exact", timesteps=(499,)))
    assert a.training_loss is dps_loss
    with pytest.raises(ConfigError, match="dps"):
        GradientConfig(dps="jacobian-free")
    with pytest.raises(ConfigError, match="eps_at"):
        InversionConfig(eps_at="previous")


def test_eps_at_current_reads_each_states_own_timestep_and_inverts_diffusers_step(
    pixel_model64, pixel_model_dir
):
    model, steps = pixel_model64, 10
    x0 = model.images_to_x0(random_images(2, seed=5, dtype=torch.float64))
    cond = model.encode_prompts(CAPTIONS[:2])
    calls = []

    def eps_fn(x, t):
        calls.append((x.clone(), t))
        return model.eps(x, t, cond)

    grid = trailing_grid(steps)
    states = ddim_invert(eps_fn, x0, model.alphas_cumprod, steps, grid[:-1], eps_at="current")
    # 1. call j reads (x_{j-1}, t_{j-1}); the clean state reads t_1
    assert [t for _, t in calls] == [grid[0], *grid[:-2]]
    chain = [x0, *(states[t] for t in grid[:-1])]
    for (x, _), expected in zip(calls, chain, strict=False):
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
    # 2. diffusers' DDIMScheduler step, given the eps we read, maps x_j back to x_{j-1}
    sched = DDIMScheduler.from_pretrained(
        pixel_model_dir, subfolder="scheduler", timestep_spacing="trailing", set_alpha_to_one=True
    )
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.set_timesteps(steps)
    for j, t in enumerate(grid[:-1]):
        eps = model.eps(*calls[j], cond)
        back = sched.step(eps, t, chain[j + 1], eta=0.0).prev_sample
        torch.testing.assert_close(back, chain[j], rtol=1e-9, atol=1e-9)


def test_eps_at_current_invert_then_regenerate_converges_on_analytic_model(pixel_model64):
    """Data x0 ~ N(mu, s2 I) has eps in closed form; the inversion run back by the sampler
    recovers x0 with a first-order error that refining the grid removes."""
    abar = pixel_model64.alphas_cumprod
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    x0 = mu + 0.5 * torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)

    def eps_fn(x, t):
        a = float(abar[t])
        return (1 - a) ** 0.5 * (x - a**0.5 * mu) / (a * 0.25 + 1 - a)

    errors = []
    for steps in (10, 50, 250):
        x_t = ddim_invert(eps_fn, x0, abar, steps, keep=[899], eps_at="current")[899]
        recovered, _ = ddim_sample(eps_fn, x_t, abar, steps, start=899)
        errors.append(float((recovered - x0).abs().max() / x0.abs().max()))
    assert errors[0] > 3 * errors[1] > 9 * errors[2], errors
    assert errors[2] < 1e-2, errors


@pytest.mark.parametrize("dps", ["approx", "exact"])
def test_shared_forwards_give_the_unshared_features(dps, pixel_model64):
    """featurize_batch with the shared forwards == the inversion (eps_at="current") followed by
    the per-timestep gradients as separate forwards."""
    model = pixel_model64
    config = _config(dps=dps, eps_at="current", timesteps=(99, 299, 599))
    attributor = Attributor(model, config)
    assert shares_forward(config)
    images = random_images(3, seed=3, dtype=torch.float64)
    phi, ok = attributor.featurize_batch(images, CAPTIONS)
    x0, cond = model.images_to_x0(images), model.encode_prompts(CAPTIONS)
    total, ok_ref = attributor._summed_gradients(
        attributor.states(x0, cond), x0, cond, attributor.training_loss
    )
    assert ok.all() and ok_ref.all()
    torch.testing.assert_close(phi, attributor.projector.project(total), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"dps": "approx"},
        {"eps_at": "current"},
        {"dps": "approx", "eps_at": "current"},
        {"dps": "approx", "eps_at": "current", "timesteps": (299, 599, 899)},
        {"dps": "exact", "eps_at": "current", "timesteps": (399, 799)},
        {"dps": "approx", "eps_at": "current", "guidance": 3.0, "timesteps": (499,)},
        {"method": "trak", "eps_at": "current"},
    ],
)
def test_analytic_fe_equals_hook_count(options, pixel_model):
    config = _config(**options)
    attributor = Attributor(pixel_model, config)
    with PassCounter(pixel_model.unet) as counter:
        _, ok = attributor.featurize_batch(random_images(3, seed=4), CAPTIONS)
    assert ok.all()
    assert counter.fe_per_sample(3) == analytic_fe(config, 1000)["total"]


def test_fe_of_the_cheap_configurations():
    fe = {
        name: analytic_fe(_config(**kw), 1000)["total"]
        for name, kw in {
            "today": {"timesteps": tuple(range(99, 900, 100))},
            "A": {"dps": "approx", "eps_at": "current", "timesteps": (299, 599, 899)},
            "B": {"dps": "approx", "eps_at": "current", "timesteps": (199, 399, 599, 799)},
            "C": {"dps": "exact", "eps_at": "current", "timesteps": (399, 799)},
        }.items()
    }
    assert fe == {"today": 54, "A": 16, "B": 17, "C": 17}
