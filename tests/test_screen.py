"""The float32 screen + float64 rescore equals a plain float64 top-k: random rows, exact
ties, near-ties that float32 cannot tell apart, overflow, and a reduced-precision matmul."""

from __future__ import annotations

import pytest
import torch

import pipeline.scan.screen
from ctrak.kernel import scores
from ctrak.topk import topk
from pipeline.scan.screen import (
    _half_screen,
    _half_sum_is_float32,
    error_bound,
    exact_topk,
    screen_scores,
)


def _reference(phi: torch.Tensor, x: torch.Tensor, k: int, ids: torch.Tensor):
    """Dense float64 scores, top-k by (score desc, id asc): row positions and values."""
    order = torch.argsort(ids)  # rows in id order, so topk's ascending index = ascending id
    best = topk(scores(phi[order], x), k)
    return order[best.indices], best.values


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_equals_float64_topk_with_ties_and_shuffled_ids(dtype, k):
    gen = torch.Generator().manual_seed(k)
    phi = torch.randn(1500, 24, generator=gen).to(dtype)
    phi[900] = phi[3]  # exact ties: the lower id must rank first
    phi[17] = phi[3]
    x = torch.randn(4, 24, generator=gen, dtype=torch.float64)
    x[1] = x[0] * 1e-30  # a tiny query: scaled by a power of two, no underflow
    ids = torch.randperm(1500, generator=gen) * 3 + 5  # unique, unordered
    got = exact_topk(phi, x, k, ids)
    rows, values = _reference(phi, x, k, ids)
    assert torch.equal(got.indices, rows)
    torch.testing.assert_close(got.values, values, rtol=1e-12, atol=0)


def test_near_ties_that_float32_reorders_rank_as_in_float64():
    """Rows phi_j = (1, j) and x = (1, 1e-9): float64 scores 1 + j 1e-9 are distinct, float32
    rounds every one of them to 1.0 (a tie that float32 would break by the lowest row)."""
    n, k = 60, 5
    j = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    phi = torch.stack([torch.ones(n), j.float()], dim=1).to(torch.float16)  # (n, 2) exact
    x = torch.tensor([[1.0, 1e-9]], dtype=torch.float64)
    s32 = screen_scores(phi, x.float())
    assert torch.all(s32 == 1.0)  # float32 cannot tell the rows apart ...
    float32_rows = topk(s32, k).indices[0]
    truth = torch.argsort(j, descending=True)[:k]  # ... float64 can: the largest j first
    assert not torch.equal(float32_rows, truth)
    got = exact_topk(phi, x, k, torch.arange(n))
    assert torch.equal(got.indices[0], truth)
    assert torch.equal(got.indices, _reference(phi, x, k, torch.arange(n))[0])


@pytest.mark.parametrize("native", [True, False])
def test_error_bound_holds_on_adversarial_sums(native):
    """Cancelling sums of large terms: |float32 - float64| stays under E, on the fused kernel
    (pipeline.scan.native) and on torch's convert-then-matmul path."""
    gen = torch.Generator().manual_seed(5)
    phi = (torch.randn(400, 512, generator=gen) * 300).half()
    x = torch.randn(6, 512, generator=gen, dtype=torch.float64)
    x[:, 1::2] = -x[:, ::2]  # pairs that nearly cancel
    x32 = x.float()
    exact = scores(phi, x32.double())  # the float32 inputs, summed in float64
    eps = error_bound(x32, float(phi.double().norm(dim=1).max()))  # (q, 1)
    assert torch.all((screen_scores(phi, x32, native=native).double() - exact).abs() <= eps)


def test_overflow_and_reduced_precision_fall_back_to_float64():
    phi = torch.tensor([[3e38, 3e38], [3e38, -3e38], [1.0, 2.0]])  # float32 overflows
    x = torch.tensor([[1.0, 0.5], [-1.0, 1.0]], dtype=torch.float64)
    got = exact_topk(phi, x, 2, torch.arange(3))
    rows, values = _reference(phi, x, 2, torch.arange(3))
    assert torch.equal(got.indices, rows) and torch.equal(got.values, values)
    gen = torch.Generator().manual_seed(3)
    phi = torch.randn(300, 16, generator=gen).half()
    x = torch.randn(2, 16, generator=gen, dtype=torch.float64)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # mm may use bfloat16: no float32 bound
        got = exact_topk(phi, x, 6, torch.arange(300))
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(got.indices, _reference(phi, x, 6, torch.arange(300))[0])


def test_screen_blocks_equal_one_float32_matmul_and_empty_input():
    gen = torch.Generator().manual_seed(4)
    phi = torch.randn(1100, 32, generator=gen).half()
    x = torch.randn(3, 32, generator=gen)
    torch.testing.assert_close(
        screen_scores(phi, x, block_rows=256), x @ phi.float().T, rtol=1e-5, atol=1e-5
    )
    empty = exact_topk(phi[:0], x.double(), 4, torch.arange(0))
    assert empty.indices.shape == (3, 0) and empty.values.dtype == torch.float64


def _split(phi: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(phi, sizes))


@pytest.mark.parametrize("half_path", [True, False])
@pytest.mark.parametrize("k", [1, 9])
def test_one_query_over_row_blocks_equals_float64_topk(half_path, k, monkeypatch):
    """One query over float16 row blocks (a file's Parquet pages): the float16 matrix-vector
    screen (or, when torch could reduce in float16, the float32 one) gives the float64 top-k,
    exact ties and near-ties included."""
    if not half_path:
        monkeypatch.setattr(pipeline.scan.screen, "_half_sum_is_float32", lambda: False)
    gen = torch.Generator().manual_seed(10 + k)
    phi = torch.randn(1300, 40, generator=gen).half()
    phi[700] = phi[5]  # an exact tie across blocks
    phi[800, 0] = phi[5, 0] + float(torch.finfo(torch.float16).eps) * phi[5, 0].abs()
    x = torch.randn(1, 40, generator=gen, dtype=torch.float64)
    ids = torch.randperm(1300, generator=gen)
    got = exact_topk(_split(phi, [512, 1, 400, 387]), x, k, ids)
    rows, values = _reference(phi, x, k, ids)
    assert torch.equal(got.indices, rows)
    torch.testing.assert_close(got.values, values, rtol=1e-12, atol=0)


def test_half_screen_error_bound_holds_on_adversarial_sums():
    """Large cancelling terms and tiny entries (float16 subnormals after scaling): the float16
    screen's scores stay within E of x~ . phi computed in float64."""
    gen = torch.Generator().manual_seed(6)
    phi = (torch.randn(600, 512, generator=gen) * 200).half()
    phi[:, :8] = 1e-7  # subnormal in float16
    x = torch.randn(1, 512, generator=gen, dtype=torch.float64)
    x[:, 1::2] = -x[:, ::2] * (1 + 1e-4)
    x[:, 100:140] *= 1e-9  # underflow to float16 subnormals/zero once scaled
    norm = float(phi.double().norm(dim=1).max())
    s, eps, scale = _half_screen(_split(phi, [300, 300]), x, norm)
    x_scaled = x * scale
    exact = x_scaled @ phi.double().T  # (1, n) the scaled query, summed in float64
    assert torch.all((s.double() - exact).abs() <= eps)
    assert float(x_scaled.norm()) * norm <= 2**14


def test_half_path_off_when_torch_may_reduce_in_float16(monkeypatch):
    """The float16 screen's bound needs float32 accumulation: when torch allows float16
    reductions on the CPU, the probe turns the path off."""
    getter = "_get_cpu_allow_fp16_reduced_precision_reduction"
    _half_sum_is_float32.cache_clear()
    monkeypatch.setattr(torch._C, getter, lambda: True, raising=False)
    try:
        assert _half_sum_is_float32() is False
    finally:
        _half_sum_is_float32.cache_clear()
