"""Seeded random JL projection phi = P^T g, generated block by block (TRAK's projection).

P (D, k) is never held whole: its rows for parameter `name`, column block j of `block` rows,
are drawn from `generator(seed, "projection", kind, k, name, j)`, entries +-1/sqrt(k)
(Rademacher) or N(0, 1/k) (Gaussian). The matrix is a pure function of
(seed, kind, k, parameter layout), so any process regenerates it bit for bit, and E||P^T g||^2
= ||g||^2.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch

from ctrak.errors import ConfigError
from ctrak.numerics import upcast
from ctrak.seeds import generator

BLOCK_ROWS = 8192  # rows of P per generated block (part of the definition of P)


class Projector:
    """P for a layout [(name, numel), ...]; project(g (B, D)) -> (B, k) float32.

    Blocks are cached in memory up to `cache_bytes` (default 256 MB) so a long featurize run
    generates them once; larger projections are regenerated per call."""

    def __init__(
        self,
        layout: Sequence[tuple[str, int]],
        k: int,
        seed: int = 0,
        kind: str = "rademacher",
        cache_bytes: int = 256 << 20,
    ) -> None:
        if not isinstance(k, int) or k <= 0:
            raise ConfigError(f"projection k={k!r} must be a positive integer (e.g. 1024)")
        if kind not in ("rademacher", "gaussian"):
            raise ConfigError(f"projection kind {kind!r} must be 'rademacher' or 'gaussian'")
        self.layout = [(str(name), int(n)) for name, n in layout]
        self.k, self.seed, self.kind = k, seed, kind
        self.dim = sum(n for _, n in self.layout)
        self._cache: dict[tuple[str, int], torch.Tensor] | None = (
            {} if self.dim * k * 4 <= cache_bytes else None
        )

    @property
    def layout_hash(self) -> str:
        """Hash of the parameter layout (names and sizes) that P is defined over."""
        text = ";".join(f"{name}:{n}" for name, n in self.layout)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _block(self, name: str, j: int, rows: int) -> torch.Tensor:
        """Rows [j * BLOCK_ROWS, j * BLOCK_ROWS + rows) of P for parameter `name`: (rows, k)."""
        key = (name, j)
        if self._cache is not None and key in self._cache:
            return self._cache[key]
        gen = generator(self.seed, "projection", self.kind, self.k, name, j)
        if self.kind == "rademacher":
            block = torch.randint(0, 2, (rows, self.k), generator=gen, dtype=torch.int8)
            block = (block.float() * 2 - 1) / self.k**0.5
        else:
            block = torch.randn(rows, self.k, generator=gen) / self.k**0.5
        if self._cache is not None:
            self._cache[key] = block
        return block

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(row offset into D, block (rows, k)) over all of P, in layout order."""
        offset = 0
        for name, numel in self.layout:
            for j, start in enumerate(range(0, numel, BLOCK_ROWS)):
                rows = min(BLOCK_ROWS, numel - start)
                yield offset + start, self._block(name, j, rows)
            offset += numel

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """g (B, D) -> P^T g (B, k) in float32 (float64 for float64 g), block by block."""
        if g.shape[-1] != self.dim:
            raise ConfigError(f"gradient has {g.shape[-1]} entries, the layout {self.dim}")
        g = upcast(g)
        out = torch.zeros(g.shape[0], self.k, dtype=g.dtype, device=g.device)
        for offset, block in self.blocks():
            rows = block.shape[0]
            out += g[:, offset : offset + rows] @ block.to(g.device, g.dtype)
        return out

    def dense(self) -> torch.Tensor:
        """The whole P (D, k), for tests on small layouts."""
        return torch.cat([block for _, block in self.blocks()], dim=0)
