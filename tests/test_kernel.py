"""Kernel and top-k: merged partial Grams equal the dense Gram, the Cholesky solve equals a
dense solve, and merged per-chunk top-k equals the global top-k (ties included)."""

from __future__ import annotations

import pytest
import torch

from ctrak.errors import ConfigError, NumericsError
from ctrak.kernel import damping, fit_kernel, gram, scores, solve
from ctrak.topk import merge_topk, topk


def _features(n=103, k=16, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def test_merged_partial_grams_equal_dense_gram():
    phi = _features().half().float()  # stored precision
    parts = [gram(chunk) for chunk in phi.split(17)]
    merged = sum(parts)
    assert merged.dtype == torch.float64
    dense = phi.double().T @ phi.double()
    torch.testing.assert_close(merged, dense, rtol=1e-12, atol=1e-10)


def test_cholesky_solve_and_scores_equal_dense_inverse():
    phi, g = _features(), _features(3, seed=1)
    kernel = fit_kernel(gram(phi), ratio=0.5)
    K = phi.double().T @ phi.double()
    assert kernel.lam == pytest.approx(0.5 * 0.1 * torch.trace(K).item() / 16)
    expected = g.double() @ torch.linalg.inv(K + kernel.lam * torch.eye(16, dtype=torch.float64))
    torch.testing.assert_close(solve(kernel, g), expected)
    torch.testing.assert_close(scores(phi, solve(kernel, g)), expected @ phi.double().T)


def test_damping_and_bad_kernels_are_named():
    with pytest.raises(ConfigError, match="damping ratio"):
        damping(torch.eye(3), 0)
    with pytest.raises(NumericsError, match="trace"):
        fit_kernel(torch.zeros(4, 4))
    with pytest.raises(NumericsError, match="NaN"):
        fit_kernel(torch.full((2, 2), float("nan")))


@pytest.mark.parametrize("k", [1, 5, 40, 500])
def test_merged_chunk_topk_equals_global_topk(k):
    gen = torch.Generator().manual_seed(2)
    s = torch.randint(0, 30, (4, 301), generator=gen).double()  # many ties
    whole = topk(s, k)
    parts = [
        topk(chunk, k, offset)
        for offset, chunk in zip(range(0, 301, 50), s.split(50, 1), strict=True)
    ]
    merged = merge_topk(parts, k)
    assert torch.equal(merged.indices, whole.indices)
    assert torch.equal(merged.values, whole.values)
    # descending scores, ties by ascending index, and the right values
    m = min(k, 301)
    assert whole.indices.shape == (4, m)
    assert torch.equal(s.gather(1, whole.indices), whole.values)
    ref = sorted(range(301), key=lambda i: (-s[0, i].item(), i))[:m]
    assert whole.indices[0].tolist() == ref


def test_topk_bad_k():
    with pytest.raises(ConfigError, match="positive integer"):
        topk(torch.zeros(1, 3), 0)


def test_scores_do_not_depend_on_the_other_rows_or_queries():
    """A row scored alone, in a subset or with other queries gives the same float64 bits (a
    BLAS matmul does not: its summation order follows the shapes), so exact ties stay ties
    between shards, blocks and the engine; and the values are x . phi to rounding."""
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(700, 96, generator=gen).half()
    x = torch.randn(5, 96, generator=gen, dtype=torch.float64)
    full = scores(phi, x)
    for rows in ([3], [3, 4], list(range(0, 700, 9)), [699, 0, 257]):
        assert torch.equal(scores(phi[rows], x), full[:, rows])
        assert torch.equal(scores(phi[rows], x[2:3]), full[2:3, rows])
    torch.testing.assert_close(full, x @ phi.double().T, rtol=1e-12, atol=1e-12)
