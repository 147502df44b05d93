"""The JL projection: reproducible across processes, blockwise equals dense, norms kept."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import pytest
import torch

from ctrak.errors import ConfigError
from ctrak.projection import BLOCK_ROWS, Projector

LAYOUT = [("down.attn2.to_q.weight", 3 * BLOCK_ROWS + 17), ("mid.conv.bias", 40), ("up.w", 999)]

_DIGEST = """
import hashlib, sys
from ctrak.projection import Projector
layout = eval(sys.argv[1])
p = Projector(layout, k=int(sys.argv[2]), seed=int(sys.argv[3]), kind=sys.argv[4])
print(hashlib.sha256(p.dense().numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_identical_in_separate_processes(kind):
    args = [repr(LAYOUT), "64", "11", kind]
    here = hashlib.sha256(
        Projector(LAYOUT, k=64, seed=11, kind=kind).dense().numpy().tobytes()
    ).hexdigest()
    other = [
        subprocess.run(
            [sys.executable, "-c", _DIGEST, *args], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert other == [here, here]
    changed = Projector(LAYOUT, k=64, seed=12, kind=kind).dense()
    assert hashlib.sha256(changed.numpy().tobytes()).hexdigest() != here


def test_blockwise_equals_dense():
    gen = torch.Generator().manual_seed(0)
    projector = Projector(LAYOUT, k=48, seed=3, cache_bytes=0)  # regenerate every block
    dense = projector.dense()
    assert dense.shape == (projector.dim, 48)
    g = torch.randn(5, projector.dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(projector.project(g), g @ dense.double())
    cached = Projector(LAYOUT, k=48, seed=3)
    torch.testing.assert_close(cached.project(g), projector.project(g))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_norms_and_inner_products_within_jl_bounds(kind):
    k = 1024
    projector = Projector(LAYOUT, k=k, seed=5, kind=kind)
    g = torch.randn(30, projector.dim, generator=torch.Generator().manual_seed(1))
    phi = projector.project(g)
    ratio = phi.norm(dim=1) / g.norm(dim=1)
    # JL: all n = 30 squared norms within 1 +- eps, eps = sqrt(8 ln(2n / delta) / k), delta 1e-3
    eps = (8 * math.log(2 * 30 / 1e-3) / k) ** 0.5  # 0.29 at k = 1024
    assert ((ratio**2 - 1).abs() < eps).all(), ratio
    assert (ratio**2 - 1).abs().mean() < 0.1  # typical error ~ sqrt(2 / k) = 0.044
    cos_g = torch.nn.functional.cosine_similarity(g[:15], g[15:])
    cos_phi = torch.nn.functional.cosine_similarity(phi[:15], phi[15:])
    assert (cos_phi - cos_g).abs().max() < eps


def test_bad_k_is_named():
    for k in (0, -3, 2.5):
        with pytest.raises(ConfigError, match="positive integer"):
            Projector(LAYOUT, k=k)
    with pytest.raises(ConfigError, match="entries"):
        Projector(LAYOUT, k=8).project(torch.zeros(1, 10))
