"""Per-sample gradients against a loop of single backward passes, the DPS direction against
finite differences, and the scale invariance that per-timestep normalisation buys."""

from __future__ import annotations

import pytest
import torch
from helpers import random_images

from ctrak import losses
from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig
from ctrak.gradients import normalize_rows, per_sample_grads
from ctrak.losses import TRAINING_LOSSES, UTILITY_LOSSES, LossInputs, dps_direction


def _inputs(model, t=499, batch=3, seed=0):
    x0 = model.images_to_x0(random_images(batch, seed=seed, dtype=torch.float64))
    gen = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    abar = float(model.alphas_cumprod[t])
    x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
    cond = model.encode_prompts(["a red triangle", "a blue circle", "a red circle"][:batch])
    negative = model.encode_prompts(["a triangle", "a circle", "a circle"][:batch])
    return LossInputs(model.eps, x_t, t, abar, cond, x0, noise, negative)


def _loop_grads(model, params, term, inp):
    """Reference: one ordinary backward pass per sample on the nn.Module."""
    rows = []
    for i in range(inp.x_t.shape[0]):
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        eps = model.unet(inp.x_t[i : i + 1], inp.t, encoder_hidden_states=inp.cond[i : i + 1])
        term.objective(eps.sample, term.target[i : i + 1])[0].backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params.values()]))
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    return torch.stack(rows)


ALL_LOSSES = {**TRAINING_LOSSES, **{f"utility-{k}": v for k, v in UTILITY_LOSSES.items()}}


@pytest.mark.parametrize("name", sorted(ALL_LOSSES))
@pytest.mark.parametrize("layout", ["pixel", "latent"])
def test_per_sample_grads_match_single_backward_loop(name, layout, pixel_model64, latent_model64):
    model = pixel_model64 if layout == "pixel" else latent_model64
    params = model.attributed_parameters(("attn2", "conv_out", "time_embedding"))
    inp = _inputs(model)
    term = ALL_LOSSES[name](inp)
    fast = per_sample_grads(
        model.eps, params, term.objective, inp.x_t, inp.t, inp.cond, term.target
    )
    slow = _loop_grads(model, params, term, inp)
    assert fast.shape == slow.shape == (3, sum(p.numel() for p in params.values()))
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert slow.abs().max() > 1e-6  # the check compared something


def test_dps_direction_matches_finite_differences(pixel_model64):
    inp = _inputs(pixel_model64, t=299)
    _, v = dps_direction(inp)

    def error(x):  # ||x0_hat(x) - x0||^2 per sample
        eps = pixel_model64.eps(x, inp.t, inp.cond)
        x0_hat = (x - (1 - inp.abar_t) ** 0.5 * eps) / inp.abar_t**0.5
        return (x0_hat - inp.x0).pow(2).flatten(1).sum(1)

    gen = torch.Generator().manual_seed(7)
    for _ in range(3):
        d = torch.randn(inp.x_t.shape, generator=gen, dtype=torch.float64)
        h = 1e-5
        fd = (error(inp.x_t + h * d) - error(inp.x_t - h * d)) / (2 * h)  # (B,)
        analytic = -(v * d).flatten(1).sum(1)
        torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=1e-6)


def test_dps_gradient_is_twice_the_vjp_with_v(pixel_model64):
    """grad_theta ||sg[eps - v] - eps||^2 = 2 J^T v (docs/method.md eq. 7)."""
    model = pixel_model64
    params = model.attributed_parameters(("attn2",))
    inp = _inputs(model, batch=2)
    term = TRAINING_LOSSES["concept-trak"](inp)
    g = per_sample_grads(model.eps, params, term.objective, inp.x_t, inp.t, inp.cond, term.target)
    _, v = dps_direction(inp)
    vjp = per_sample_grads(
        model.eps, params, lambda e, y: 2 * (e * y).flatten(1).sum(1), inp.x_t, inp.t, inp.cond, v
    )
    torch.testing.assert_close(g, vjp)


def test_normalize_rows_flags_zero_and_nonfinite():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0]])
    unit, ok = normalize_rows(g)
    assert ok.tolist() == [True, False, False]
    torch.testing.assert_close(unit[0], torch.tensor([0.6, 0.8]))
    assert (unit[1:] == 0).all()


def _scaled(loss, scales):
    """loss with its objective multiplied by a positive per-timestep constant."""

    def wrapped(inp):
        term = loss(inp)
        c = scales[inp.t]
        return losses.LossTerm(lambda e, y, f=term.objective: c * f(e, y), term.target)

    return wrapped


@pytest.mark.parametrize("method", ["concept-trak", "das"])
def test_positive_loss_scales_change_no_score(method, pixel_model64, monkeypatch):
    """Per-timestep normalisation cancels lambda_t, beta, sigma_data and any loss scale."""
    cfg = AttributionConfig(
        gradient=GradientConfig(method=method, timesteps=(99, 499, 899)),
        projection=ProjectionConfig(k=64),
    )
    images = random_images(4, seed=3, dtype=torch.float64)
    captions = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"]
    query = Query("a red triangle", concept="red", image=images[:1])

    def run():
        attributor = Attributor(pixel_model64, cfg)
        features = attributor.featurize(images, captions, batch_size=4)
        return features, attributor.scores([query], features, attributor.fit(features))

    features, scores = run()
    scales = {99: 0.01, 499: 7.0, 899: 123.0}
    monkeypatch.setitem(TRAINING_LOSSES, method, _scaled(TRAINING_LOSSES[method], scales))
    monkeypatch.setitem(UTILITY_LOSSES, "concept", _scaled(UTILITY_LOSSES["concept"], scales))
    features2, scores2 = run()
    torch.testing.assert_close(features2, features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores2, scores, rtol=1e-4, atol=1e-7)
