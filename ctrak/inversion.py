"""Deterministic DDIM (eta = 0) in both directions on the trailing timestep grid.

Grid: t_j = round(j * T / N) - 1 for j = 1..N (diffusers' "trailing" spacing), so N = 10 gives
99, 199, ..., 999 and N = 50 gives 19, 39, ..., 999; state j = 0 is the clean x0 (abar = 1).

Inversion (x0 -> x_t) follows diffusers' DDIMInverseScheduler: the step into t_j evaluates
eps at the current state with timestep t_j,

    x0_hat  = (x_{j-1} - sqrt(1 - abar_{j-1}) eps) / sqrt(abar_{j-1})        (Tweedie)
    x_j     = sqrt(abar_j) x0_hat + sqrt(1 - abar_j) eps.

With eps_at="current" the step out of a state t_{j-1} (j >= 2) evaluates eps there instead,
eps(x_{j-1}, t_{j-1}), in the same two formulas: each step is still the exact inverse of
DDIMScheduler's step given its eps, and a gradient at t_{j-1}, which needs eps(x_{j-1},
t_{j-1}) too, can share that forward (`ctrak.shared`). The clean state has no timestep of
its own, so the first step reads t_1 in both conventions.

Sampling (x_T -> x0) is DDIMScheduler's step with eps evaluated at (x_j, t_j). Both take an
`eps_fn(x, t) -> eps`, so guidance is decided by the caller (see `guided_eps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ctrak.errors import ConfigError

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
EPS_AT: tuple[str, ...] = ("next", "current")


def trailing_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """[t_1, ..., t_N] ascending, t_j = round(j * T / N) - 1 (computed as diffusers does)."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ConfigError(f"num_steps={num_steps} must lie in [1, {num_train_timesteps}]")
    ratio = num_train_timesteps / num_steps
    grid = torch.arange(num_train_timesteps, 0, -ratio, dtype=torch.float64).flip(0)
    return [int(v) - 1 for v in torch.round(grid).tolist()]


def check_on_grid(timesteps: Sequence[int], num_steps: int, num_train_timesteps: int) -> None:
    """Raise ConfigError unless every timestep is a state of the inversion grid."""
    grid = set(trailing_grid(num_steps, num_train_timesteps))
    off = [t for t in timesteps if t not in grid]
    if off:
        raise ConfigError(
            f"timesteps {off} are not on the {num_steps}-step DDIM grid "
            f"{sorted(grid)[:4]}...; choose inversion steps N with T/N dividing t+1"
        )


def guided_eps(
    eps: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor],
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
) -> EpsFn:
    """eps_fn for CFG: eps_u + w (eps_c - eps_u), both branches in one batched forward.
    guidance == 1 (or no uncond) is the conditional branch alone."""

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        if uncond is None or guidance == 1.0:
            return eps(x, t, cond)
        both = eps(torch.cat([x, x]), t, torch.cat([cond, uncond]))  # (2B, C, h, w)
        eps_c, eps_u = both.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    return eps_fn


def _abar(alphas_cumprod: torch.Tensor, t: int, like: torch.Tensor) -> torch.Tensor:
    value = 1.0 if t < 0 else float(alphas_cumprod[t])
    return torch.tensor(value, dtype=like.dtype, device=like.device)


@torch.no_grad()
def ddim_invert(
    eps_fn: EpsFn,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_steps: int,
    keep: Sequence[int],
    eps_at: str = "next",
    state_eps: EpsFn | None = None,
) -> dict[int, torch.Tensor]:
    """x0 (B, C, h, w) -> {t: x_t (B, C, h, w)} for every t in `keep` (all on the grid).

    Stops at max(keep): inverting to t = 899 on a 10-step grid costs 9 network calls.
    eps_at="next" reads eps(x_{j-1}, t_j) (DDIMInverseScheduler); "current" reads
    eps(x_{j-1}, t_{j-1}) from the second step on, through `state_eps` when given (a call
    at a state's own timestep: (x_t, t) -> eps), else `eps_fn`.
    """
    if eps_at not in EPS_AT:
        raise ConfigError(f"inversion eps_at={eps_at!r} is not one of {list(EPS_AT)}")
    T = int(alphas_cumprod.shape[0])
    check_on_grid(keep, num_steps, T)
    grid = trailing_grid(num_steps, T)
    last = max(keep)
    states: dict[int, torch.Tensor] = {}
    x, t_prev = x0, -1
    for t in grid:
        # 1. eps at the current state: at the target timestep (DDIMInverseScheduler), or at
        #    the state's own timestep (eps_at="current"; the clean state reads t_1)
        if eps_at == "current" and t_prev >= 0:
            eps = (state_eps or eps_fn)(x, t_prev).to(x.dtype)
        else:
            eps = eps_fn(x, t).to(x.dtype)
        a_prev, a_t = _abar(alphas_cumprod, t_prev, x), _abar(alphas_cumprod, t, x)
        # 2. Tweedie estimate of x0, then 3. re-noise deterministically to t
        x0_hat = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        x = a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * eps
        if t in keep:
            states[t] = x
        if t >= last:
            break
        t_prev = t
    return states


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    x_T: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_steps: int,
    keep: Sequence[int] = (),
    start: int | None = None,
    clip_x0: float | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """x_T (B, C, h, w) at t_N (or at grid timestep `start`) -> (x0 (B, C, h, w),
    {t: x_t} for t in `keep` on the grid). `clip_x0` clamps the Tweedie estimate to
    [-clip_x0, clip_x0] (diffusers' clip_sample; needed for pixel models whose schedule ends
    at abar ~ 0, where x0_hat divides by sqrt(abar))."""
    T = int(alphas_cumprod.shape[0])
    grid = trailing_grid(num_steps, T)
    check_on_grid([*keep, *([start] if start is not None else [])], num_steps, T)
    states: dict[int, torch.Tensor] = {}
    x = x_T
    first = grid.index(start) if start is not None else len(grid) - 1
    for j in range(first, -1, -1):
        t, t_prev = grid[j], grid[j - 1] if j > 0 else -1
        if t in keep:
            states[t] = x
        # 1. eps at (x_t, t); 2. Tweedie x0_hat; 3. deterministic step to t_prev
        eps = eps_fn(x, t).to(x.dtype)
        a_t, a_prev = _abar(alphas_cumprod, t, x), _abar(alphas_cumprod, t_prev, x)
        x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip_x0 is not None:
            x0_hat = x0_hat.clamp(-clip_x0, clip_x0)  # eps is kept, as in DDIMScheduler
        x = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps
    return x, states


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, abar_t: float) -> torch.Tensor:
    """q(x_t | x0) with given noise: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    return abar_t**0.5 * x0 + (1 - abar_t) ** 0.5 * noise
