"""Query scan over a synthetic feature store, the memory-bandwidth reference, Fisher merge.

Product store: Parquet files in `pipeline.store`'s layout and writer (one 10k-row file per
shard, `feature_table` + `parquet_bytes`: feature fixed_size_binary(2k) float16 PLAIN and
uncompressed, feature_norm, snappy string columns), independent standard normal features in
every file.
The product scan is `pipeline.scan.scanner`'s per-task path run in one process without Ray: each
file memory-mapped (in the page cache, as a query task holds a shard's bytes after its GET;
not counted: the transfer and the sha256 check against the marker) -> `score_files` (per
file: the float16 rows viewed in place in the Parquet pages, a float16 (1 query) or float32
screen, a float64 rescore of the few rows that can reach the top-k, hit columns decoded only
for rows that enter the running top-k) -> `gather`. Its top-k is checked against a dense float64
top-k of the first file.

Arithmetic ceiling: `pipeline.scan.screen.screen` alone (one query: float16 matrix-vector;
several: the fused float16 -> float32 FMA kernel of `pipeline.scan.native`, or where it is not
built float16 -> float32 in cache and x Phi^T in float32) over float16 rows already in memory,
no decode: the scan cannot beat it.
Copy bandwidth: `np.copyto` of one buffer, repeated to the store's feature bytes; the median
of the copies is the reference. All of it single-threaded (torch threads = bench --threads,
Arrow decodes in the calling thread).
Fisher: `FeatureStore.write_shard` partial Grams and `pipeline.fisher.update_fisher` (load,
verify, add k x k float64 partials, factorise), per 1M rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ctrak.kernel import fit_kernel, gram, scores, solve
from ctrak.topk import topk

CAPTIONS = ("a blue triangle", "a red circle", "a blue circle")


def _features(seed: int, i: int, n: int, k: int) -> np.ndarray:
    """File i's (n, k) float16 features: independent standard normal rows (a store whose
    files repeat each other's best rows would make every file a contender for the top-k)."""
    rng = np.random.default_rng([seed, i])
    return rng.standard_normal((n, k), dtype=np.float32).astype(np.float16)


def _columns(shard: str, n: int) -> dict:
    captions = [CAPTIONS[r % 3] for r in range(n)]
    return {
        "row": np.arange(n, dtype=np.int64),
        "key": [f"{shard}{r:05d}" for r in range(n)],
        "caption": captions,
        "metadata": [json.dumps({"caption": c}) for c in captions],
    }


def write_store(root: Path, rows: int, k: int, file_rows: int, seed: int = 0) -> dict[str, object]:
    """Write a synthetic store of `rows` x `k` in pipeline.store's layout and writer
    (`feature_table` + `parquet_bytes`) -> {files, rows, k, bytes_on_disk, seconds}."""
    from pipeline.feature_file import feature_table, parquet_bytes

    begin = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, start in enumerate(range(0, rows, file_rows)):
        n, shard = min(file_rows, rows - start), f"{i:05d}"
        data = parquet_bytes(feature_table(shard, _columns(shard, n), _features(seed, i, n, k)))
        path, tmp = root / f"{shard}.parquet", root / f"{shard}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        files.append(str(path))
    return {
        "files": files,
        "rows": rows,
        "k": k,
        "bytes_on_disk": sum(os.path.getsize(f) for f in files),
        "seconds": time.perf_counter() - begin,
    }


def _mapped(path: str) -> pa.Buffer:
    """A file's bytes mapped read-only with its page-table entries populated up front (Linux
    MAP_POPULATE: no page faults while scanning, no bytes pulled through the CPU caches)."""
    import mmap

    with open(path, "rb") as handle:
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(handle.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    return pa.py_buffer(mapped)  # unmapped when the last view goes


def product_scan(
    files: list[str], x: np.ndarray, top: int, after_file: Callable[[], None] | None = None
) -> tuple[list[list[dict]], int, float]:
    """pipeline.scan.scanner's scan in one process: x (q, k) float64 -> (hits per query, rows,
    seconds spent mapping files). Each file is mapped from the page cache (its bytes in memory, as a
    query task holds a shard's bytes after the GET; the mapping is the GET's stand-in, so its
    seconds are returned for the caller to leave out) -> `score_files` (features read in place
    from the Parquet pages, each file against the running top-k) -> `gather`. `after_file`
    runs after each file (the memory probe)."""
    from pipeline.scan.scanner import gather, score_files

    shard_index = {Path(f).stem: i for i, f in enumerate(sorted(files))}
    rows, loading = [0], [0.0]

    def mapped():
        for path in files:
            begin = time.perf_counter()
            data = _mapped(path)
            rows[0] += pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            loading[0] += time.perf_counter() - begin
            yield data
            begin = time.perf_counter()
            del data  # the last reference: unmapped here, on the loading clock
            loading[0] += time.perf_counter() - begin
            if after_file is not None:
                after_file()

    best = score_files(mapped(), x=x, top_k=top, shard_index=shard_index)
    return gather(best, x.shape[0], top), rows[0], loading[0]


def copy_bandwidth(total_bytes: int, buffer_bytes: int = 256 << 20) -> dict[str, float]:
    """np.copyto between two buffers, repeated to `total_bytes`: bytes per second of each
    copy -> {"median", "best", "buffer_bytes"} (a shared machine: the median is the reference)."""
    size = min(buffer_bytes, max(total_bytes, 1 << 20))
    src = np.ones(size // 8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    rates = []
    for _ in range(max(3, -(-total_bytes // src.nbytes))):
        begin = time.perf_counter()
        np.copyto(dst, src)
        rates.append(src.nbytes / (time.perf_counter() - begin))
    return {"median": float(np.median(rates)), "best": max(rates), "buffer_bytes": src.nbytes}


def query_vectors(k: int, q: int, seed: int = 0) -> np.ndarray:
    """x = (K + lam I)^-1 g (q, k) float64 for a random Gram K and random g, as
    pipeline.query solves it."""
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(4 * k, k, generator=gen)
    g = torch.randn(q, k, generator=gen)
    return solve(fit_kernel(gram(phi)), g).numpy()


def check_exact(files: list[str], x: np.ndarray, top: int) -> float:
    """The product scan of files[0] vs a dense float64 top-k of its features
    (`ctrak.kernel.scores` + `ctrak.topk.topk`) -> the fraction of top rows that agree."""
    import pyarrow.parquet as pq

    from pipeline.feature_file import table_features

    phi = torch.from_numpy(table_features(pq.read_table(files[0])))  # (n, k) float16
    exact = topk(scores(phi, torch.from_numpy(x)), top)  # rows in file order
    hits, _, _ = product_scan(files[:1], x, top)
    rows = torch.tensor([[h["row"] for h in per_query] for per_query in hits])
    return float((rows == exact.indices).double().mean())


def measure_ceiling(k: int, q: int, rows: int, repeats: int = 3) -> dict[str, float]:
    """`pipeline.scan.screen.screen` of x (q, k) over `rows` random float16 rows in memory, in
    blocks of a file's size, no decode (the best of `repeats`): the float16 matrix-vector screen
    for one query, the float32 one for several, as the scan runs them -> {"rows_per_s",
    "bytes_per_s", "gflop_per_s"}."""
    from pipeline.scan.screen import screen

    gen = torch.Generator().manual_seed(2)
    phi = torch.randn(rows, k, generator=gen).to(torch.float16)
    blocks = list(torch.split(phi, 10_000))
    x = torch.randn(q, k, generator=gen, dtype=torch.float64)
    norm = float(phi[:1000].float().norm(dim=1).max()) * 2
    screen(blocks[:1], x, norm)
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        screen(blocks, x, norm)
        best = min(best, time.perf_counter() - begin)
    return {
        "rows": rows,
        "rows_per_s": rows / best,
        "bytes_per_s": rows * k * 2 / best,
        "gflop_per_s": 2 * rows * k * q / best / 1e9,
    }


def measure_fisher(
    workdir: Path, k: int, *, gram_rows: int, merge_shards: int, shard_rows: int
) -> dict[str, object]:
    """Seconds per 1M rows to form partial Grams (ctrak.kernel.gram of float16 rows, as
    write_shard does) and to merge them (update_fisher over `merge_shards` shards of
    `shard_rows` rows, minus its one factorisation, scaled to 1M rows)."""
    from pipeline.fisher import update_fisher
    from pipeline.shards import ShardRef
    from pipeline.store import FeatureStore

    gen = torch.Generator().manual_seed(1)
    phi = torch.randn(gram_rows, k, generator=gen).to(torch.float16)
    begin = time.perf_counter()
    K = gram(phi)
    gram_seconds = time.perf_counter() - begin
    store = FeatureStore(str(workdir / "fisher-store"))
    store.open({"projection_k": k, "benchmark": "synthetic"}, "float16", create=True)
    base = phi[:shard_rows].float().numpy()
    for s in range(merge_shards):
        shard = f"{s:05d}"
        features = np.roll(base, s, axis=0)
        store.write_shard(
            ShardRef(shard, f"synthetic/{shard}.tar", 0),
            _columns(shard, shard_rows),
            features,
            [],
            "float16",
        )
    quiet = logging.getLogger("ctrak.fisher")
    level, quiet.level = quiet.level, logging.WARNING
    try:
        begin = time.perf_counter()
        _, merged = update_fisher(store, 1.0)
        merge_seconds = time.perf_counter() - begin
    finally:
        quiet.setLevel(level)
    begin = time.perf_counter()
    fit_kernel(K)
    fit_seconds = time.perf_counter() - begin
    per_shard = max(merge_seconds - fit_seconds, 0.0) / merged
    gram_per_1m = gram_seconds * 1e6 / gram_rows
    merge_per_1m = per_shard * 1e6 / shard_rows + fit_seconds
    return {
        "gram_rows_measured": gram_rows,
        "gram_seconds": gram_seconds,
        "gram_s_per_1m_rows": gram_per_1m,
        "merge_shards_measured": merged,
        "shard_rows": shard_rows,
        "update_fisher_seconds": merge_seconds,
        "factorise_seconds": fit_seconds,
        "merge_s_per_1m_rows": merge_per_1m,
        "total_s_per_1m_rows": gram_per_1m + merge_per_1m,
    }
