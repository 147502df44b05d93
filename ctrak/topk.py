"""Top-k by descending score, per chunk and merged: merge(chunks) == top-k of the whole.

Ties break by ascending global index, so the merge is exact and deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctrak.errors import ConfigError


@dataclass(frozen=True)
class TopK:
    values: torch.Tensor  # (q, m) float64, descending
    indices: torch.Tensor  # (q, m) int64, global row indices


def _order(values: torch.Tensor, indices: torch.Tensor, k: int) -> TopK:
    # sort by index first, then stably by descending value: ties end up in index order
    by_index = torch.argsort(indices, dim=1, stable=True)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    by_value = torch.argsort(values, dim=1, descending=True, stable=True)[:, :k]
    return TopK(values.gather(1, by_value), indices.gather(1, by_value))


def topk(scores: torch.Tensor, k: int, offset: int = 0) -> TopK:
    """scores (q, n) of rows offset..offset+n-1 -> their top min(k, n) per query."""
    if not isinstance(k, int) or k <= 0:
        raise ConfigError(f"top-k k={k!r} must be a positive integer")
    scores = scores.to(torch.float64)
    q, n = scores.shape
    m = min(k, n)
    if m < n:  # pre-select with a margin for ties, then order exactly
        cut = torch.topk(scores, m, dim=1).values[:, -1:]  # (q, 1) k-th largest
        keep = scores >= cut
        width = int(keep.sum(1).max())
        idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        vals = scores.gather(1, idx)
        vals = torch.where(keep.gather(1, idx), vals, torch.full_like(vals, -torch.inf))
    else:
        idx = torch.arange(n).expand(q, n)
        vals = scores
    return _order(vals, idx + offset, m)


def merge_topk(parts: Sequence[TopK], k: int) -> TopK:
    """Merge per-chunk top-k results (same queries) into the global top-k."""
    if not parts:
        raise ConfigError("merge_topk needs at least one part")
    values = torch.cat([p.values for p in parts], dim=1)
    indices = torch.cat([p.indices for p in parts], dim=1)
    return _order(values, indices, min(k, values.shape[1]))
