"""Loss functions, one per method, in plain registries (docs/method.md eqs. 5-7, 11-12, section 5).

Every loss is written as `objective(eps_theta(x_t), target)` with a detached target, so its
parameter gradient is a vector-Jacobian product of the network output alone:

- concept-trak (DPS reward, training side): target = sg[eps - v] with
      x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),   v = -grad_{x_t} ||x0_hat - x0||^2
  so L = ||sg[eps - v] - eps||^2 and grad_theta L = 2 J^T v. v is computed in float32.
  `dps_approx_loss` drops the network Jacobian d eps / d x_t (x0_hat's Jacobian ~ I / sqrt(abar_t),
  the common DPS approximation): v = -2 (x0_hat - x0) / sqrt(abar_t), no backward to x_t.
  Since x0_hat - x0 = sqrt(1 - abar_t) / sqrt(abar_t) (noise - eps) for the implied noise of x_t,
  v = 2 sqrt(1 - abar_t) / abar_t (eps - noise): after the per-timestep normalisation this is
  the denoising (TRAK) gradient at the inverted state with its implied noise.
- trak (denoising score matching): target = the noise eps that made x_t; L = ||eps - eps_theta||^2.
- d-trak: L = ||eps_theta||^2.
- das: L = ||eps_theta||_1 (output-norm gradient; unit-normalised per timestep by default).
- concept utility (query side, concept slider / CFG): u = eps(x_t, c) - sg[eps(x_t, c-)],
      L = ||sg[eps_c + u] - eps_c||^2,   grad_theta L = -2 J_c^T u   (lambda_c = 1: it cancels).

Sign convention, shared by both sides: every gradient is that of a loss, so the score
g_query^T (K + lambda I)^-1 phi_i is positive when a descent step on z_i lowers the query loss,
i.e. strengthens the concept (or the query image, for whole-image losses).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ctrak.numerics import upcast

EpsCall = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def squared_error(eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) x (B, ...) -> (B,): ||target - eps||^2 per sample."""
    return (target - eps).pow(2).flatten(1).sum(1)


def squared_norm(eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): ||eps||^2 per sample (target unused)."""
    return eps.pow(2).flatten(1).sum(1)


def absolute_norm(eps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): ||eps||_1 per sample (target unused)."""
    return eps.abs().flatten(1).sum(1)


@dataclass(frozen=True)
class LossInputs:
    """One timestep of a batch. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise holds exactly
    (for inverted states `noise` is the implied one). `negative` is the c- condition."""

    eps: EpsCall
    x_t: torch.Tensor  # (B, C, h, w)
    t: int
    abar_t: float
    cond: torch.Tensor  # (B, L, D)
    x0: torch.Tensor  # (B, C, h, w)
    noise: torch.Tensor  # (B, C, h, w)
    negative: torch.Tensor | None = None  # (B, L, D)


@dataclass(frozen=True)
class LossTerm:
    """What the per-sample gradient needs: the objective and its detached target."""

    objective: Objective
    target: torch.Tensor  # (B, C, h, w), float32, no grad


def dps_from_graph(
    eps: torch.Tensor, x: torch.Tensor, x0: torch.Tensor, abar_t: float, retain_graph: bool = False
) -> torch.Tensor:
    """v (B, C, h, w) = -grad_x ||x0_hat - x0||^2 for eps = eps_theta(x) still in the graph.

    Samples are independent in the network, so the gradient of the summed error is each
    sample's own gradient."""
    # 1. Tweedie estimate of x0
    x0_hat = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    # 2. reconstruction error per sample, 3. its gradient w.r.t. x_t
    error = (x0_hat - upcast(x0)).pow(2).flatten(1).sum(1)  # (B,)
    (grad_x,) = torch.autograd.grad(error.sum(), x, retain_graph=retain_graph)
    return -grad_x


def dps_direction(inp: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, v), both (B, C, h, w), at least float32, backpropagated through the frozen
    network: v = -grad_{x_t} ||x0_hat - x0||^2 per sample."""
    x = upcast(inp.x_t.detach()).requires_grad_(True)
    with torch.enable_grad():
        eps = inp.eps(x, inp.t, inp.cond)
        v = dps_from_graph(eps, x, inp.x0, inp.abar_t)
    return eps.detach(), v


def dps_direction_approx(
    eps: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, abar_t: float
) -> torch.Tensor:
    """v (B, C, h, w) = -2 (x0_hat - x0) / sqrt(abar_t), the DPS direction with d eps / d x_t
    dropped; eps (B, C, h, w) is used as a constant. At least float32."""
    eps, x_t = upcast(eps.detach()), upcast(x_t.detach())
    # 1. Tweedie estimate of x0, 2. the reconstruction error's gradient through x0_hat alone
    x0_hat = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    return -2 * (x0_hat - upcast(x0).to(x0_hat)) / abar_t**0.5


def dps_approx_loss(inp: LossInputs) -> LossTerm:
    """The DPS loss with the approximate direction: one no-grad forward for eps."""
    with torch.no_grad():
        eps = upcast(inp.eps(inp.x_t, inp.t, inp.cond))
    v = dps_direction_approx(eps, inp.x_t, inp.x0, inp.abar_t)
    return LossTerm(squared_error, (eps - v).detach())


def dps_loss(inp: LossInputs) -> LossTerm:
    eps, v = dps_direction(inp)
    return LossTerm(squared_error, (eps - v).detach())


def denoising_loss(inp: LossInputs) -> LossTerm:
    return LossTerm(squared_error, upcast(inp.noise.detach()))


def output_norm_loss(inp: LossInputs) -> LossTerm:
    return LossTerm(squared_norm, torch.zeros_like(upcast(inp.x_t)))


def output_l1_loss(inp: LossInputs) -> LossTerm:
    return LossTerm(absolute_norm, torch.zeros_like(upcast(inp.x_t)))


def concept_utility(inp: LossInputs) -> LossTerm:
    """Concept slider: target = eps_c + (eps_c - eps_c-), both branches in one forward."""
    if inp.negative is None:
        raise ValueError("concept_utility needs the negative condition")
    with torch.no_grad():
        both = inp.eps(torch.cat([inp.x_t, inp.x_t]), inp.t, torch.cat([inp.cond, inp.negative]))
        eps_c, eps_neg = upcast(both).chunk(2)
    return LossTerm(squared_error, eps_c + (eps_c - eps_neg))


LossFn = Callable[[LossInputs], LossTerm]

TRAINING_LOSSES: dict[str, LossFn] = {
    "concept-trak": dps_loss,
    "trak": denoising_loss,
    "d-trak": output_norm_loss,
    "das": output_l1_loss,
}

UTILITY_LOSSES: dict[str, LossFn] = {"concept": concept_utility}

DPS_LOSSES: dict[str, LossFn] = {"exact": dps_loss, "approx": dps_approx_loss}
