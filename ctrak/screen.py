"""The exact float64 top-k of I = x Phi^T from a float32 screen and a float64 rescore.

Scoring every stored row in float64 costs 4x the bytes and half the arithmetic rate of
float32; the top-k needs float64 only where float32 could reorder rows. With x scaled by a
power of two (x~ = x / 2^e, max |x~| <= 1: exact, no float32 overflow) the float32 scores
obey (Higham, Accuracy and Stability of Numerical Algorithms, sec. 3.1, for any summation
order, FMA or not; plus the rounding of x~ to float32; plus Cauchy-Schwarz)

    s32_ij = fl32(x~_i . phi_j),   |s32_ij - x~_i . phi_j| <= E_i   for every row j,
    E_i = c_k ||x~_i|| N + tiny_k (1 + N),   N = max_j ||phi_j||,   c_k = 2 (k + 2) 2^-24

(the factor 2 also covers float64's own rounding, norms stored in float32 and
gamma_k = k u / (1 - k u) over k u; tiny_k = k 2^-126 bounds underflow). Let t_i be the
m-th largest s32_i. At least m rows score >= t_i - E_i; a row with s32_ij < t_i - 2 E_i
scores < t_i - E_i, so it is beaten strictly by m rows and is not in the top-m whatever the
tie-break. Every other row (about m per query) is rescored in float64 (`kernel.scores`) and
the top-m taken from those (`topk.merge_topk`: descending, ties by ascending id). The result
equals the float64 top-k over all rows. A block whose float32 scores are not all finite, or
any block while torch allows float32 matmuls in lower precision
(torch.set_float32_matmul_precision other than "highest"), is scored in float64 whole.
"""

from __future__ import annotations

import math

import torch

from ctrak.kernel import scores
from ctrak.topk import TopK, merge_topk

BLOCK_ROWS = 512  # rows converted to float32 at a time: 2 MB at k = 1024, stays in cache


def screen_scores(phi: torch.Tensor, x: torch.Tensor, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """phi (n, k) float16|float32, x (q, k) float32 -> s32 (q, n) float32 = x phi^T, converted
    to float32 block_rows rows at a time (the block stays in cache for the matmul)."""
    n, k = phi.shape
    s32 = torch.empty(x.shape[0], n)  # (q, n)
    if phi.dtype == torch.float32:
        return torch.mm(x, phi.T, out=s32)
    buffer = torch.empty(min(block_rows, n), k)  # (b, k) float32
    for start in range(0, n, block_rows):
        b = min(block_rows, n - start)
        buffer[:b].copy_(phi[start : start + b])  # float16 -> float32, in cache
        torch.mm(x, buffer[:b].T, out=s32[:, start : start + b])  # (q, b)
    return s32


def error_bound(x: torch.Tensor, phi_norm: float) -> torch.Tensor:
    """x~ (q, k) as fed to `screen_scores`, N >= every ||phi_j|| -> E (q, 1) float64: a bound on
    |s32_ij - x~_i . phi_j| over all rows j (module docstring)."""
    k = x.shape[1]
    c = 2.0 * (k + 2) * 2.0**-24
    tiny = k * 2.0**-126
    x_norm = torch.linalg.vector_norm(x.to(torch.float64), dim=1, keepdim=True)  # (q, 1)
    return c * x_norm * phi_norm + tiny * (1.0 + phi_norm)


def exact_topk(
    phi: torch.Tensor,
    x: torch.Tensor,
    k: int,
    ids: torch.Tensor,
    norms: torch.Tensor | None = None,
) -> TopK:
    """phi (n, k) float16|float32, x (q, k) float64, ids (n,) int64 unique (they order ties),
    norms ||phi_j|| (n,) (computed when None) -> the float64 top-min(k, n) of x phi^T per
    query: values (q, m) float64 = kernel.scores of those rows, indices (q, m) their rows in
    phi (0..n-1), in rank order: descending score, ties by ascending id."""
    q, n = x.shape[0], phi.shape[0]
    m = min(k, n)
    if m == 0:
        return TopK(torch.empty(q, 0, dtype=torch.float64), torch.empty(q, 0, dtype=torch.int64))
    if norms is None:
        norms = torch.linalg.vector_norm(phi.to(torch.float64), dim=1)  # (n,)
    # 1. the float32 screen, x scaled by a power of two so that max |x~| <= 1
    scale = float(x.abs().max())
    exponent = math.frexp(scale)[1] if 0 < scale < math.inf else 0
    x_scaled = (x.to(torch.float64) * 2.0 ** -max(exponent, -1000)).to(torch.float32)
    s32 = screen_scores(phi, x_scaled)  # (q, n)
    phi_norm = float(norms.max())
    ieee = torch.get_float32_matmul_precision() == "highest"  # else mm may round to bfloat16
    if ieee and math.isfinite(float(s32.sum(dtype=torch.float64)) + phi_norm):
        # 2. keep the rows within 2 E of the m-th largest float32 score (a float64 threshold:
        #    s32 >= t holds exactly when s32 >= t rounded up to float32)
        eps = error_bound(x_scaled, phi_norm)  # (q, 1)
        t = torch.topk(s32, m, dim=1).values[:, -1:].to(torch.float64)  # (q, 1)
        keep = torch.ge(s32, t - 2 * eps).any(0).nonzero().squeeze(1)  # (c,) union of queries
    else:  # overflow, NaN or a reduced-precision matmul: every row in float64
        keep = torch.arange(n)
    # 3. rescore the kept rows in float64 (float16 -> float32 is exact and fast); the exact
    #    top-m by (score desc, id asc), ids replaced by their ranks among the kept rows
    s64 = scores(phi.index_select(0, keep).to(torch.float32), x)  # (q, c) float64
    order = torch.argsort(ids[keep])  # (c,) rank -> kept row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())  # (c,) kept row -> rank
    best = merge_topk([TopK(s64, rank.expand(q, -1))], m)  # indices: ranks
    return TopK(best.values, keep[order[best.indices]])
