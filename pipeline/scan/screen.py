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
Over float16 rows the float32 screen runs in the fused kernel of `pipeline.scan.native` where it is
built (the same float32 products, summed in another order: covered), else torch converts
blocks to float32 and multiplies.

One query over float16 rows (the usual ad-hoc query) screens with torch's float16
matrix-vector product instead, which reads the stored bytes directly (no float32 copy; about
twice the rate here). It multiplies in float32 and rounds each score to float16, so with x~
scaled to ||x~|| N <= 2^14 and max |x~| <= 2^14 (no float16 overflow) and rounded to float16:

    E = 2 (2^-10 + (k + 2) 2^-24) X N + 2^-24 (1 + sqrt(k) N),   X = ||x~|| (1 + 2^-10)

(x~'s rounding 2^-11 X N + 2^-25 sqrt(k) N, the float32 sum gamma_k X N, the score's rounding
2^-11 X N + 2^-25, doubled). That rests on torch accumulating in float32, so the path is taken
only while torch disallows reduced-precision float16 reductions on the CPU and a probe that a
float16 sum would get wrong comes out exact; otherwise the float32 screen runs.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence

import torch

from ctrak.kernel import scores
from ctrak.topk import TopK, merge_topk
from pipeline.scan.native import screen16

BLOCK_ROWS = 512  # rows converted to float32 at a time: 2 MB at k = 1024, stays in cache

Blocks = torch.Tensor | Sequence[torch.Tensor]


def _blocks(phi: Blocks) -> list[torch.Tensor]:
    return [phi] if isinstance(phi, torch.Tensor) else list(phi)


def screen_scores(
    phi: Blocks, x: torch.Tensor, block_rows: int = BLOCK_ROWS, native: bool = True
) -> torch.Tensor:
    """phi (n, k) float16|float32 (or row blocks of it, in order), x (q, k) float32 -> s32 (q, n)
    float32 = x phi^T, float16 rows converted to float32 block_rows rows at a time (the block
    stays in cache for the matmul), or by the fused kernel of `pipeline.scan.native` where it is
    built (`native=False`: torch's path only)."""
    blocks = _blocks(phi)
    n, k = sum(b.shape[0] for b in blocks), x.shape[1]
    s32 = torch.empty(x.shape[0], n)  # (q, n)
    x = x.contiguous()
    buffer = torch.empty(0)
    offset = 0
    for block in blocks:
        out = s32[:, offset : offset + block.shape[0]]
        if block.dtype == torch.float32:
            torch.mm(x, block.T, out=out)
            offset += block.shape[0]
            continue
        if native and screen16(
            block, x, out
        ):  # the same float32 sums, fused (pipeline.scan.native)
            offset += block.shape[0]
            continue
        if buffer.numel() == 0:
            buffer = torch.empty(min(block_rows, n), k)  # (b, k) float32
        for start in range(0, block.shape[0], block_rows):
            b = min(block_rows, block.shape[0] - start)
            buffer[:b].copy_(block[start : start + b])  # float16 -> float32, in cache
            torch.mm(x, buffer[:b].T, out=s32[:, offset : offset + b])  # (q, b)
            offset += b
    return s32


@functools.cache
def _half_sum_is_float32() -> bool:
    """torch's float16 matrix-vector product accumulates in float32 here: reduced-precision
    float16 reductions are off, and 2048 x (1 + 2^-10) sums to 2050 (a float16 running sum
    drops the 2^-10 terms once it passes 1024)."""
    getter = getattr(torch._C, "_get_cpu_allow_fp16_reduced_precision_reduction", None)
    if getter is None or getter():
        return False
    ones = torch.ones(2, 2048, dtype=torch.float16)
    probe = torch.mv(ones, torch.full((2048,), 1 + 2**-10, dtype=torch.float16))
    return probe.dtype == torch.float16 and bool((probe.float() == 2050.0).all())


def _half_screen(
    blocks: list[torch.Tensor], x: torch.Tensor, phi_norm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query x (1, k) float64 over float16 blocks -> (s (1, n) float32: the float16 product
    with x~ = x c, E (1, 1) float64: a bound on |s_j - x~ . phi_j| (module docstring), the
    scale c = 2^-e (1, 1) float64)."""
    k = x.shape[1]
    norm, top = float(torch.linalg.vector_norm(x)), float(x.abs().max())
    exponent = max(math.frexp(norm * phi_norm)[1], math.frexp(top)[1]) - 14
    scale = 2.0 ** -max(exponent, -1000)
    x_scaled = x[0] * scale  # float64, exact
    x16 = x_scaled.to(torch.float16)
    s = torch.cat([torch.mv(b, x16) for b in blocks]).to(torch.float32)[None]  # (1, n)
    X = float(torch.linalg.vector_norm(x_scaled)) * (1 + 2.0**-10)
    bound = 2 * (2.0**-10 + (k + 2) * 2.0**-24) * X * phi_norm + 2.0**-24 * (
        1 + math.sqrt(k) * phi_norm
    )
    return s, torch.tensor([[bound]], dtype=torch.float64), torch.tensor([[scale]])


def _float32_screen(
    blocks: list[torch.Tensor], x: torch.Tensor, phi_norm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (q, k) float64 -> (s32 (q, n) of x~ = x c in float32, E (q, 1) float64, the scale
    c = 2^-e (q, 1) float64), c such that max |x~| <= 1. E is infinite while torch allows
    float32 matmuls in lower precision (torch.set_float32_matmul_precision other than
    "highest": mm may round to bfloat16)."""
    top = float(x.abs().max())
    exponent = math.frexp(top)[1] if 0 < top < math.inf else 0
    scale = 2.0 ** -max(exponent, -1000)
    x_scaled = (x * scale).to(torch.float32)
    eps = error_bound(x_scaled, phi_norm)
    if torch.get_float32_matmul_precision() != "highest":
        eps = torch.full_like(eps, math.inf)
    return screen_scores(blocks, x_scaled), eps, torch.full((x.shape[0], 1), scale)


def error_bound(x: torch.Tensor, phi_norm: float) -> torch.Tensor:
    """x~ (q, k) as fed to `screen_scores`, N >= every ||phi_j|| -> E (q, 1) float64: a bound on
    |s32_ij - x~_i . phi_j| over all rows j (module docstring)."""
    k = x.shape[1]
    c = 2.0 * (k + 2) * 2.0**-24
    tiny = k * 2.0**-126
    x_norm = torch.linalg.vector_norm(x.to(torch.float64), dim=1, keepdim=True)  # (q, 1)
    return c * x_norm * phi_norm + tiny * (1.0 + phi_norm)


def _take_rows(blocks: list[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """rows (c,) ascending positions in the concatenation of blocks -> those rows (c, k)."""
    if len(blocks) == 1:
        return blocks[0].index_select(0, rows)
    starts = [0]
    for b in blocks:
        starts.append(starts[-1] + b.shape[0])
    picked = []
    for row in rows.tolist():
        i = bisect.bisect_right(starts, row) - 1
        picked.append(blocks[i][row - starts[i]])
    return torch.stack(picked) if picked else blocks[0][:0]


def _no_rows(q: int) -> TopK:
    """The empty top-k of q queries: values (q, 0) float64, indices (q, 0) int64."""
    return TopK(torch.empty(q, 0, dtype=torch.float64), torch.empty(q, 0, dtype=torch.int64))


def _is_half(blocks: list[torch.Tensor], x: torch.Tensor) -> bool:
    """Whether `screen` takes the float16 path for these inputs."""
    return (
        x.shape[0] == 1 and all(b.dtype == torch.float16 for b in blocks) and _half_sum_is_float32()
    )


def screen(
    phi: Blocks, x: torch.Tensor, phi_norm: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (q, k) float64 over phi's rows, N = phi_norm >= every ||phi_j|| -> (s (q, n) float32,
    E (q, 1) float64, c (q, 1) float64): the float16 matrix-vector screen for one query over
    float16 rows, else the float32 screen; |s_ij - c_i x_i . phi_j| <= E_i (module
    docstring; c_i a power of two)."""
    blocks = _blocks(phi)
    if _is_half(blocks, x) and 0 < phi_norm * float(x.abs().max()) * x.shape[1] < math.inf:
        return _half_screen(blocks, x, phi_norm)
    return _float32_screen(blocks, x, phi_norm)


def exact_topk(
    phi: Blocks,
    x: torch.Tensor,
    k: int,
    ids: torch.Tensor,
    norms: torch.Tensor | None = None,
    floor: torch.Tensor | None = None,
) -> TopK:
    """phi (n, k) float16|float32 (or row blocks of it, in order, one dtype), x (q, k)
    float64, ids (n,) int64 unique (they order ties), norms ||phi_j|| (n,) (computed when None)
    -> the float64 top-min(k, n) of x phi^T per query: values (q, m) float64 = kernel.scores of
    those rows, indices (q, m) their rows in phi (0..n-1), in rank order: descending score,
    ties by ascending id.

    `floor` (q,) float64, the k-th score of a running top-k (-inf where it is not full): rows
    that score below floor_i for every query i cannot enter it and are dropped by the screen;
    the top-min(k, c) of the c rows left is returned ((q, 0) when none is left). Rows below
    the floor for some queries may still be returned for those: the caller filters exactly."""
    blocks = _blocks(phi)
    q, n = x.shape[0], sum(b.shape[0] for b in blocks)
    m = min(k, n)
    if m == 0:
        return _no_rows(q)
    if norms is None:
        norms = torch.cat([torch.linalg.vector_norm(b.to(torch.float64), dim=1) for b in blocks])
    x = x.to(torch.float64)
    phi_norm = float(norms.max())
    # 1. the screen: float16 matrix-vector for one query over float16 rows, else float32
    s32, eps, scale = screen(blocks, x, phi_norm)
    if math.isfinite(float(s32.sum(dtype=torch.float64)) + float(eps.sum())):
        if floor is not None:  # s32 < c floor - E: below the floor; often the whole block is
            cut = floor.to(torch.float64)[:, None] * scale - eps  # (q, 1)
            if bool((s32.max(1, keepdim=True).values < cut).all()):
                return _no_rows(q)
        # 2. keep the rows within 2 E of the m-th largest screened score (a float64 threshold:
        #    s32 >= t holds exactly when s32 >= t rounded up to float32)
        t = torch.topk(s32, m, dim=1).values[:, -1:].to(torch.float64)  # (q, 1)
        wanted = torch.ge(s32, t - 2 * eps)  # (q, n)
        if floor is not None:
            wanted &= torch.ge(s32, cut)
        keep = wanted.any(0).nonzero().squeeze(1)  # (c,) union of queries
    else:  # overflow, NaN or a reduced-precision matmul (E = inf): every row in float64
        keep = torch.arange(n)
    if keep.numel() == 0:
        return _no_rows(q)
    # 3. rescore the kept rows in float64 (float16 -> float32 is exact and fast); the exact
    #    top-m by (score desc, id asc), ids replaced by their ranks among the kept rows
    s64 = scores(_take_rows(blocks, keep).to(torch.float32), x)  # (q, c) float64
    order = torch.argsort(ids[keep])  # (c,) rank -> kept row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())  # (c,) kept row -> rank
    best = merge_topk([TopK(s64, rank.expand(q, -1))], min(m, keep.numel()))  # indices: ranks
    return TopK(best.values, keep[order[best.indices]])
