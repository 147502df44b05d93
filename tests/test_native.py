"""The fused float16 screen kernel (pipeline.scan.native): built here, equal to float64 sums
within the screen's float32 bound, any query count and row length, and a clean fallback to
torch's path when it cannot be built."""

from __future__ import annotations

import pytest
import torch

from ctrak.topk import topk
from pipeline.scan import native
from pipeline.scan.screen import error_bound, exact_topk, screen_scores


def test_kernel_is_built_on_this_machine():
    """CI and the dev machines are x86-64 with a C compiler: a fallback here would hide a
    broken build behind torch's path."""
    status = native.status()
    assert status.available, status.reason


@pytest.mark.parametrize("q", [1, 3, 8, 11])
@pytest.mark.parametrize("k", [1024, 1001, 5])
def test_kernel_equals_float64_within_the_float32_bound(q, k):
    """k = 1001 and 5 leave a tail after the 8-lane loop; q = 11 is a group of 8 then 3."""
    gen = torch.Generator().manual_seed(q * 100 + k)
    phi = (torch.randn(700, k, generator=gen) * 50).half()
    x = torch.randn(q, k, generator=gen)
    x[:, 1::2] = -x[:, ::2][:, : x[:, 1::2].shape[1]]  # cancelling pairs
    out = torch.full((q, 700), float("nan"))
    assert native.screen16(phi, x, out)
    exact = x.double() @ phi.double().T
    bound = error_bound(x, float(phi.double().norm(dim=1).max()))
    assert torch.all((out.double() - exact).abs() <= bound)


def test_kernel_writes_into_a_column_slice_and_leaves_the_rest():
    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(300, 64, generator=gen).half()
    x = torch.randn(4, 64, generator=gen)
    wide = torch.zeros(4, 1000)
    assert native.screen16(phi, x, wide[:, 500:800])
    torch.testing.assert_close(wide[:, 500:800], x @ phi.float().T, rtol=1e-5, atol=1e-5)
    assert torch.all(wide[:, :500] == 0) and torch.all(wide[:, 800:] == 0)


def test_unsupported_layouts_are_refused_untouched():
    phi = torch.randn(40, 16).half()
    x = torch.randn(2, 16)
    out = torch.zeros(2, 40)
    assert not native.screen16(phi[:, ::2], x[:, :8], out[:, :40])  # strided rows
    assert not native.screen16(phi.float(), x, out)  # float32 rows: torch's mm
    assert not native.screen16(phi, x.double(), out)
    assert not native.screen16(phi, x, torch.zeros(2, 41))  # wrong output shape
    assert torch.all(out == 0)


def test_exact_topk_is_the_same_with_and_without_the_kernel():
    gen = torch.Generator().manual_seed(2)
    phi = torch.randn(5000, 96, generator=gen).half()
    phi[4000] = phi[7]  # an exact tie
    x = torch.randn(6, 96, generator=gen, dtype=torch.float64)
    ids = torch.randperm(5000, generator=gen)
    fused = exact_topk(list(torch.split(phi, 1234)), x, 10, ids)
    torch.testing.assert_close(
        screen_scores(phi, x.float()), screen_scores(phi, x.float(), native=False)
    )
    order = torch.argsort(ids)
    dense = topk(x @ phi[order].double().T, 10)
    assert torch.equal(fused.indices, order[dense.indices])


def test_without_a_compiler_the_screen_falls_back_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    monkeypatch.setenv("CTRAK_NATIVE_CACHE", str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        status = native.status()
        assert not status.available and "no C compiler" in status.reason
        phi, x = torch.randn(50, 8).half(), torch.randn(3, 8)
        assert not native.screen16(phi, x, torch.empty(3, 50))
        torch.testing.assert_close(screen_scores(phi, x), x @ phi.float().T)
    finally:
        native._load.cache_clear()


def test_a_failing_build_and_the_switch_fall_back(monkeypatch, tmp_path):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    monkeypatch.setenv("CTRAK_NATIVE_CACHE", str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        status = native.status()
        assert not status.available and "build failed" in status.reason
        assert "broken compiler" in status.reason
        assert not list((tmp_path / "cache").glob("*"))  # no half-written library left
        monkeypatch.setenv("CTRAK_NATIVE", "0")
        native._load.cache_clear()
        assert native.status().reason == "disabled by CTRAK_NATIVE=0"
    finally:
        native._load.cache_clear()


def test_a_prebuilt_library_runs_without_a_compiler(monkeypatch, tmp_path):
    """An image builds the kernel ahead (`python -m pipeline.scan.native`); its workers need no
    compiler to load it."""
    monkeypatch.setenv("CTRAK_NATIVE_CACHE", str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        assert native.status().reason.startswith("built with")
        native._load.cache_clear()
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
        status = native.status()
        assert status.available and status.reason == "prebuilt"
        assert status.library.startswith(str(tmp_path / "cache"))
        phi, x, out = torch.randn(20, 16).half(), torch.randn(2, 16), torch.empty(2, 20)
        assert native.screen16(phi, x, out)
        torch.testing.assert_close(out, x @ phi.float().T)
    finally:
        native._load.cache_clear()
