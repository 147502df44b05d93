"""Per-sample parameter gradients, per-timestep normalisation (docs/method.md eqs. 7-8).

`per_sample_grads` is the exact reference path: torch.func.vmap over samples of
torch.func.grad of `objective(eps_theta(x_t), target)` w.r.t. the selected parameters. It
forms the full (B, D) gradient, so it is meant for small D or small batches; the memory of a
batch is B * D floats.

    g_i = sum_t g_{i,t} / ||g_{i,t}||          (normalised, float32)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import grad, vmap

from ctrak.losses import Objective
from ctrak.numerics import upcast

ParamEps = Callable[[torch.Tensor, int, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def per_sample_grads(
    eps: ParamEps,
    params: dict[str, torch.Tensor],
    objective: Objective,
    x_t: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor:
    """x_t (B, C, h, w), cond (B, L, D), target (B, C, h, w) -> grads (B, P), P = total size
    of `params` flattened in the dict's order; float32 (float64 for a float64 model)."""
    detached = {name: p.detach() for name, p in params.items()}

    def sample_loss(p, x, c, y):
        out = eps(x[None], t, c[None], p)  # (1, C, h, w)
        return objective(out, y[None])[0]

    with warnings.catch_warnings():
        # CPU flash attention has no vmap batching rule; the fallback is correct, only slower.
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(detached, x_t, cond, target)
    B = x_t.shape[0]
    return torch.cat([upcast(grads[name].reshape(B, -1)) for name in params], dim=1)


@contextmanager
def masked_positions(unet: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside: each named linear layer's output keeps its value, but its parameter gradient
    flows only from the positions marked 1 in its (S,) mask (out = m * out + (1 - m) *
    sg[out]) - the exact-path twin of `factored_grads(masks=...)`."""

    def hook(mask: torch.Tensor) -> Callable:
        def fn(module, args, output):
            m = mask.to(output).reshape(-1, 1)
            return m * output + (1 - m) * output.detach()

        return fn

    modules = dict(unet.named_modules())
    handles = [modules[name].register_forward_hook(hook(mask)) for name, mask in masks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def normalize_rows(
    g: torch.Tensor, sq_norm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """g (B, P) -> (g / ||g|| row-wise, ok (B,) bool). `sq_norm` (B,) supplies the squared
    norms when g is a projection of the gradient whose exact norm is known. Rows with a zero,
    NaN or Inf norm are returned as zeros with ok = False: they must not be stored."""
    g = upcast(g)
    if sq_norm is None:
        norm = torch.linalg.vector_norm(g, dim=1)  # (B,)
    else:
        norm = upcast(sq_norm).sqrt()
    ok = torch.isfinite(norm) & (norm > 0)
    safe = torch.where(ok, norm, torch.ones_like(norm))
    return torch.where(ok[:, None], g / safe[:, None], torch.zeros_like(g)), ok
