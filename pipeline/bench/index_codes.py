"""Which codes: recall@10 after the exact rescore of 100 candidates, bytes per row, train/add
seconds and search time of FAISS factory strings, on N rows of the bench's mixture (fitted to
toy-paper's Concept-TRAK features) and its 16 dev queries (seed 5000), at nprobe = nlist / 16
and nlist / 4. One thread. docs/bench-index.md holds a run.

    python -m pipeline.bench.index_codes 50000 64 "IVF64,SQ4" "IVF64,PQ64x8" "IVF64,Flat"
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(argv: list[str]) -> None:
    import faiss

    from pipeline.bench import mixture as mx
    from pipeline.bench.index import load_mixture

    faiss.omp_set_num_threads(1)
    m = load_mixture()
    n, nlist = int(argv[0]), int(argv[1])
    phi = np.concatenate(list(mx.blocks(m, 1, 0, n, 65536))).astype(np.float32)  # (n, k)
    x = mx.query_vectors(m, n, 16, 5000)  # (16, k) dev queries
    exact = np.argsort(-(x @ phi.astype(np.float64).T), 1)[:, :10]
    for factory in argv[2:]:
        begin = time.perf_counter()
        index = faiss.index_factory(m.k, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(phi[: min(n, 20000)])
        trained = time.perf_counter() - begin
        begin = time.perf_counter()
        index.add(phi)
        added = time.perf_counter() - begin
        size = len(faiss.serialize_index(index))
        for nprobe in (max(nlist // 16, 1), max(nlist // 4, 1)):
            faiss.extract_index_ivf(index).nprobe = nprobe
            begin = time.perf_counter()
            _, found = index.search(x.astype(np.float32), 100)
            per_query = (time.perf_counter() - begin) / len(x)
            recall = []
            for q in range(len(x)):
                c = found[q][found[q] >= 0]
                top = c[np.argsort(-(x[q] @ phi[c].astype(np.float64).T))[:10]]
                recall.append(len(set(top) & set(exact[q])) / 10)
            print(
                f"{factory:18s} nprobe {nprobe:4d} train {trained:6.1f} s add {added:6.1f} s "
                f"B/row {size / n:7.1f} search/q {per_query * 1e3:6.2f} ms "
                f"recall@10 {np.mean(recall):.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:])
