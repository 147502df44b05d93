"""The damped Fisher kernel and the influence score (docs/method.md eqs. 1-3).

K = Phi^T Phi = sum_s Phi_s^T Phi_s               (additive over shards, float64)
lambda = r * 0.1 * trace(K) / k                   (one fixed r, never tuned per query)
I(z_i, q) = g_q^T (K + lambda I)^-1 phi_i          (Cholesky solve once per query)

With `query.partial_rest` a query has a second row, the rest of the prompt's direction g_r,
and is scored with x - beta x_r (x_r = (K + lambda I)^-1 g_r), beta = x^T K x_r / x_r^T K x_r:
the least-squares coefficient of the scores Phi x on Phi x_r over the training set, exact
from K = Phi^T Phi (docs/method.md eq. 15).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctrak.errors import ConfigError, NumericsError


def gram(features: torch.Tensor) -> torch.Tensor:
    """features (n, k) -> Phi^T Phi (k, k) float64. Partial Grams add up across shards."""
    phi = features.to(torch.float64)
    return phi.T @ phi


def damping(K: torch.Tensor, ratio: float = 1.0) -> float:
    """lambda = ratio * 0.1 * trace(K) / k."""
    if ratio <= 0:
        raise ConfigError(f"damping ratio {ratio} must be > 0")
    return float(ratio * 0.1 * torch.trace(K) / K.shape[0])


@dataclass(frozen=True)
class Kernel:
    """K (k, k) float64, its damping, and the Cholesky factor of K + lambda I."""

    K: torch.Tensor
    lam: float
    chol: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.K.shape[0])


def fit_kernel(K: torch.Tensor, ratio: float = 1.0) -> Kernel:
    """Factorise K + lambda I (lambda from the trace heuristic). Never forms an inverse."""
    K = K.to(torch.float64)
    if not torch.isfinite(K).all():
        raise NumericsError("the Gram matrix holds NaN/Inf: a stored feature is corrupt")
    lam = damping(K, ratio)
    if lam <= 0:
        raise NumericsError("trace(K) is zero: no training features were accumulated")
    eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    chol, info = torch.linalg.cholesky_ex(K + lam * eye)
    if int(info) != 0:
        raise NumericsError(f"K + lambda I is not positive definite (lambda={lam:.3g})")
    return Kernel(K=K, lam=lam, chol=chol)


def solve(kernel: Kernel, g: torch.Tensor) -> torch.Tensor:
    """g (q, k) -> x = (K + lambda I)^-1 g (q, k) float64, by the Cholesky factor."""
    rhs = g.to(torch.float64).T  # (k, q)
    return torch.cholesky_solve(rhs, kernel.chol).T


def partial_out(K: torch.Tensor, x: torch.Tensor, x_rest: torch.Tensor) -> torch.Tensor:
    """x, x_rest (k,) solved queries -> x - beta x_rest (k,) float64, beta = x^T K x_rest /
    x_rest^T K x_rest: the scores Phi (x - beta x_rest) are the residual of the least-squares
    fit of Phi x on Phi x_rest over the rows of K = Phi^T Phi (orthogonal to Phi x_rest)."""
    K, x, x_rest = K.to(torch.float64), x.to(torch.float64), x_rest.to(torch.float64)
    K_rest = K @ x_rest
    denom = float(x_rest @ K_rest)
    if not denom > 0:
        raise NumericsError(
            "the rest of the prompt scores every training image 0 (x_r^T K x_r = "
            f"{denom:.3g}): nothing to partial out; set query.partial_rest = false"
        )
    return x - float(x @ K_rest) / denom * x_rest


def solve_query(kernel: Kernel, rows: torch.Tensor) -> torch.Tensor:
    """One query's directions (m, k) -> its solved vector (k,) float64: row 0 the concept's
    g, solved; a second row (the rest's g_r under `query.partial_rest`) partialled out."""
    if rows.ndim != 2 or rows.shape[0] not in (1, 2):
        raise ConfigError(f"a query has 1 or 2 direction rows, got shape {tuple(rows.shape)}")
    x = solve(kernel, rows)
    return x[0] if rows.shape[0] == 1 else partial_out(kernel.K, x[0], x[1])


SCORE_ROWS = 256  # rows multiplied at a time: q x 256 x k float64 products


def scores(features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """features (n, k), x (q, k) -> scores (q, n) = x Phi^T, float64.

    Each score is the same float64 number whichever other rows and queries it is computed
    with (elementwise products, then one sum per score over k in a fixed order; a BLAS matmul
    sums in an order that depends on the matrix shapes, so a row rescored alone could differ in
    the last bit from the same row scored in a block). That keeps exact ties exact across
    shards, blocks and the single-process engine, so ties break by id everywhere."""
    x = x.to(torch.float64)
    out = torch.empty(x.shape[0], features.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, features.shape[0], SCORE_ROWS):
        rows = features[start : start + SCORE_ROWS].to(device=x.device, dtype=torch.float64)
        out[:, start : start + rows.shape[0]] = (x[:, None, :] * rows[None]).sum(-1)
    return out
