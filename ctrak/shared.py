"""The training side with the inversion's forwards shared by the gradient timesteps.

With eps_at="current" (ctrak.inversion) the inversion step out of a state x_t reads
eps(x_t, t, c), the very forward the training-side gradient at t needs (docs/method.md section 2:
eps = eps_theta(x_t, t, c_i), conditional, no CFG). So at a gradient timestep one forward
serves both: it runs with the gradient's hooks and graph, the per-sample gradient is taken
from it, and its eps (detached) drives the next inversion step. Per training sample, with
n_inv inversion steps up to the largest gradient timestep and |T_g| gradient timesteps:

    forwards = n_inv + 1          (the largest timestep's eps(x_t, t) is the one extra)
    backwards = |T_g| * (1 with dps="approx", 2 with dps="exact")

against n_inv + |T_g| forwards without sharing. The states and every gradient are the same
as the unshared path's (inversion with eps_at="current", then the gradients): tests check it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ctrak.config import AttributionConfig
from ctrak.gradients import normalize_rows
from ctrak.inversion import ddim_invert
from ctrak.losses import LossInputs

if TYPE_CHECKING:
    from ctrak.attribution import Attributor


def shares_forward(config: AttributionConfig) -> bool:
    """True when the training side's gradients reuse the inversion's forwards: Concept-TRAK
    on inverted states, eps_at="current", unguided inversion (the gradient's eps is the
    conditional branch alone), factored projection path."""
    g, inv = config.gradient, config.inversion
    return (
        g.method == "concept-trak"
        and g.resolved_state == "inverted"
        and inv.eps_at == "current"
        and inv.guidance == 1.0
        and config.projection.path == "factored"
    )


class _Recorded:
    """eps(x, t, c) that keeps the output of its latest call (detached) for the inversion."""

    def __init__(self, eps: Callable[..., torch.Tensor]) -> None:
        self.eps = eps
        self.last: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: int, cond: torch.Tensor, params=None) -> torch.Tensor:
        out = self.eps(x, t, cond, params)
        self.last = out.detach()
        return out


def shared_gradients(
    attributor: Attributor, x0: torch.Tensor, cond: torch.Tensor, loss: Callable
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 (B, C, h, w), cond (B, L, D) -> (sum over timesteps of the normalised layer
    projections (B, M), ok (B,)), inverting x0 and taking each timestep's gradient from the
    inversion's own forward. `loss` is the DPS loss the attributor's timestep gradient fuses."""
    model, cfg = attributor.model, attributor.config
    g, inv, abar = cfg.gradient, cfg.inversion, model.alphas_cumprod
    keep = g.timesteps
    normalize = g.resolved_normalize
    total = torch.zeros(x0.shape[0], attributor.projector.dim, device=x0.device, dtype=x0.dtype)
    ok = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
    recorded = _Recorded(attributor._eps)

    def gradient_at(x_t: torch.Tensor, t: int) -> torch.Tensor:
        nonlocal total, ok
        abar_t = float(abar[t])
        noise = (x_t - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5  # implied noise (unused by DPS)
        inputs = LossInputs(recorded, x_t, t, abar_t, cond, x0, noise)
        # 1. one forward with the gradient's hooks; its eps is recorded for the inversion
        grads, sq = attributor._timestep_gradient(loss, inputs)
        if normalize:
            grads, ok_t = normalize_rows(grads, sq)
        else:
            ok_t = torch.isfinite(grads).all(1)
        ok &= ok_t
        total += grads
        assert recorded.last is not None, "the timestep gradient ran its forward"
        return recorded.last

    def state_eps(x: torch.Tensor, t: int) -> torch.Tensor:
        # 2. a state's own-timestep eps: shared with its gradient when t is a gradient timestep
        if t in keep:
            return gradient_at(x, t)
        return model.eps(x, t, cond)

    # 3. invert (the clean state's first step reads eps(x0, t_1) alone), then the largest
    #    timestep's gradient: the one forward no inversion step needs
    states = ddim_invert(
        lambda x, t: model.eps(x, t, cond),
        x0,
        abar,
        inv.num_steps,
        keep,
        eps_at="current",
        state_eps=state_eps,
    )
    last = max(keep)
    gradient_at(states[last], last)
    return total, ok
