"""The vector index of features already in memory (the eval's training features, the bench).

The same build and search as the store's index (`pipeline.index`: one index shard, trained on
a seeded sample; `pipeline.index_query.search`), then the exact rescore of the candidates in
float64 with `ctrak.kernel.scores` and the top-k in `ctrak.topk`'s order, so the returned
scores are the exact ones and recall@k against the exact top-k measures only which rows the
index found.
"""

from __future__ import annotations

import numpy as np
import torch

from ctrak.kernel import scores
from ctrak.topk import TopK, topk
from pipeline.index import (
    IndexSpec,
    choose_nlist,
    default_nprobe,
    encode,
    factory_string,
    from_bytes,
    train,
)
from pipeline.index_query import default_rescore, search


class MemoryIndex:
    """An IVF index over phi (n, k) float16|float32 (kept, for the rescore)."""

    def __init__(self, phi: torch.Tensor, spec: IndexSpec | None = None) -> None:
        spec = spec or IndexSpec()
        spec.check()
        self.phi = phi
        n, k = phi.shape
        rng = np.random.default_rng(spec.seed)
        take = np.sort(rng.choice(n, min(spec.train_rows, n), replace=False))
        sample = phi[torch.from_numpy(take)].float().numpy()
        self.nlist = spec.nlist or choose_nlist(n, len(sample))
        self.nprobe = spec.nprobe or default_nprobe(self.nlist)
        self.factory = factory_string(k, self.nlist, spec.codes, len(sample))
        data = encode(train(sample, self.factory), [[phi.numpy()]])
        self.bytes_per_row = len(data) / n
        self.index = from_bytes(data)

    def candidates(self, x: torch.Tensor, count: int, nprobe: int | None = None) -> np.ndarray:
        """x (q, k) -> the ids (q, count) of each query's `count` best rows by the index's
        approximate score (-1: fewer found)."""
        _, ids = search(self.index, x.numpy(), nprobe or self.nprobe, count)
        return ids

    def topk(
        self, x: torch.Tensor, k: int, nprobe: int | None = None, rescore: int | None = None
    ) -> TopK:
        """x (q, k) float64 -> per query, the top-k of its own exactly rescored candidates:
        values (q, k) float64 (the exact scores), indices (q, k) rows of phi; -inf / -1 past
        the candidates where the probed lists hold fewer than k rows. (Rescoring the
        union of all queries' candidates for every query would raise recall with the number
        of queries asked together; a recall measured so would not be one query's.)"""
        ids = self.candidates(x, rescore or default_rescore(k), nprobe)  # (q, r)
        values, indices = [], []
        for i in range(len(ids)):  # each query ranks its own candidates only
            own = torch.from_numpy(np.unique(ids[i][ids[i] >= 0]))  # (c,) ascending rows
            s64 = scores(self.phi[own].float(), x[i : i + 1].to(torch.float64))  # (1, c)
            best = topk(s64, k) if len(own) else None
            value = torch.full((k,), -torch.inf, dtype=torch.float64)  # fewer found: padded
            index = torch.full((k,), -1, dtype=torch.int64)
            if best is not None:
                m = best.values.shape[1]
                value[:m], index[:m] = best.values[0], own[best.indices[0]]
            values.append(value)
            indices.append(index)
        return TopK(torch.stack(values), torch.stack(indices))


def recall(found: torch.Tensor, exact: torch.Tensor) -> list[float]:
    """Row ids (q, k) found and exact -> per query |found & exact| / k."""
    return [
        len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist(), strict=True)
    ]
