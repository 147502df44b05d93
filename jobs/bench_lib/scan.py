"""Query scan over a synthetic feature store, the memory-bandwidth reference, Fisher merge.

Product store: Parquet files in `pipeline.store`'s schema and writer settings (one 10k-row
file per shard, `feature_table` + `pq.write_table` defaults: fixed_size_list<float16>[k],
snappy, dictionary encoding), random normal features; file i is file 0's features with rows
rolled and low mantissa bits flipped (cheap to make, no exact ties). The product scan is
`pipeline.query`'s per-block path run in one process without Ray: each file's row groups ->
`score_block` (float64 `ctrak.kernel.scores`, per-block top-k) -> `gather` (merge_topk).

Alternative layout (for comparison): `row` int64 + `phi` fixed_size_binary(2k), uncompressed,
no dictionary, memory-mapped; scored in float32 blocks of BLOCK_ROWS that stay in cache, then
`ctrak.topk.topk` per row group and `merge_topk`.

Copy bandwidth: `np.copyto` of one buffer, repeated to the store's feature bytes; the median
of the copies is the reference.
Fisher: `FeatureStore.write_shard` partial Grams and `pipeline.fisher.update_fisher` (load,
verify, add k x k float64 partials, factorise), per 1M rows.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ctrak.kernel import fit_kernel, gram, solve
from ctrak.topk import TopK, merge_topk, topk

BLOCK_ROWS = 256  # rows converted to float32 at a time: 1 MB for k = 1024, stays in cache
CAPTIONS = ("a blue triangle", "a red circle", "a blue circle")


def _features(base: np.ndarray, i: int, n: int) -> np.ndarray:
    """File i's (n, k) float16 features from the base block (uint16 view)."""
    data = np.roll(base[:n], (i * 7919) % n, axis=0)
    np.bitwise_xor(data, np.uint16(i % 16), out=data)
    return data.view(np.float16)


def _columns(shard: str, n: int) -> dict:
    captions = [CAPTIONS[r % 3] for r in range(n)]
    return {
        "row": np.arange(n, dtype=np.int64),
        "key": [f"{shard}{r:05d}" for r in range(n)],
        "caption": captions,
        "metadata": [json.dumps({"caption": c}) for c in captions],
    }


def write_store(
    root: Path, rows: int, k: int, file_rows: int, layout: str = "product", seed: int = 0
) -> dict[str, object]:
    """Write a synthetic store of `rows` x `k` -> {files, rows, bytes_on_disk, seconds}.
    layout "product" (pipeline.store's schema and writer) or "fsb" (the alternative)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store import feature_table

    begin = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((min(file_rows, rows), k), dtype=np.float32)
    base = base.astype(np.float16).view(np.uint16)
    files = []
    for i, start in enumerate(range(0, rows, file_rows)):
        n, shard = min(file_rows, rows - start), f"{i:05d}"
        features = _features(base, i, n)
        if layout == "product":
            table, options = feature_table(shard, _columns(shard, n), features), {}
        else:
            phi = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(2 * k), n, [None, pa.py_buffer(features)]
            )
            table = pa.table({"row": np.arange(start, start + n, dtype=np.int64), "phi": phi})
            options = {"compression": "none", "use_dictionary": False, "write_statistics": False}
        path = root / f"{shard}.parquet"
        tmp = root / f"{shard}.tmp"
        pq.write_table(table, tmp, **options)
        os.replace(tmp, path)
        files.append(str(path))
    return {
        "layout": layout,
        "files": files,
        "rows": rows,
        "k": k,
        "bytes_on_disk": sum(os.path.getsize(f) for f in files),
        "seconds": time.perf_counter() - begin,
    }


def product_scan(
    files: list[str], x: np.ndarray, top: int, after_file: Callable[[], None] | None = None
) -> tuple[list[list[dict]], int]:
    """pipeline.query's scan in one process: x (q, k) float64 -> (hits per query, rows).
    `after_file` runs after each file (the memory probe)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.query import gather, score_block

    shard_index = {Path(f).stem: i for i, f in enumerate(sorted(files))}
    blocks, rows = [], 0
    for path in files:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group)  # every column, as ray.data.read_parquet
            blocks.append(score_block(table, x=x, top_k=top, shard_index=shard_index))
            rows += table.num_rows
            del table
        if after_file is not None:
            after_file()
    return gather(pa.concat_tables(blocks), x.shape[0], top), rows


def _fsb_chunks(files: list[str], k: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, phi (rows, k) float16 read-only view) per row group of the fsb layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    offset = 0
    for path in files:
        with pa.memory_map(path) as source:
            parquet = pq.ParquetFile(source)
            for group in range(parquet.num_row_groups):
                column = parquet.read_row_group(group, columns=["phi"]).column(0)
                for chunk in column.chunks:
                    view = np.frombuffer(
                        chunk.buffers()[1], np.float16, len(chunk) * k, chunk.offset * 2 * k
                    )
                    yield offset, view.reshape(len(chunk), k)
                    offset += len(chunk)


def fsb_scan(files: list[str], x: torch.Tensor, top: int) -> tuple[TopK, int]:
    """Streaming top-`top` of x Phi^T over the fsb layout: x (q, k) -> (TopK (q, top), rows)."""
    q, k = x.shape
    xT = x.to(torch.float32).T.contiguous()  # (k, q)
    buffer = torch.empty(BLOCK_ROWS, k)
    parts, rows = [], 0
    for offset, chunk in _fsb_chunks(files, k):
        with warnings.catch_warnings():  # a read-only view, never written to
            warnings.simplefilter("ignore", UserWarning)
            phi = torch.from_numpy(chunk)  # (n, k) float16
        n = phi.shape[0]
        out = torch.empty(n, q)
        for i in range(0, n, BLOCK_ROWS):
            m = min(BLOCK_ROWS, n - i)
            buffer[:m].copy_(phi[i : i + m])  # float16 -> float32, in cache
            torch.mm(buffer[:m], xT, out=out[i : i + m])
        parts.append(topk(out.T, top, offset))
        rows += n
    return merge_topk(parts, top), rows


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


def measure_fsb_scan(workdir: Path, rows: int, k: int, file_rows: int, q: int, top: int) -> dict:
    """Write the alternative layout, scan it twice (the faster counts), check its top rows
    against the float64 product ranking on the same data, delete it."""
    import shutil

    store = write_store(workdir / "store-fsb", rows, k, file_rows, layout="fsb")
    try:
        x = query_vectors(k, q)
        best = float("inf")
        for _ in range(2):
            begin = time.perf_counter()
            result, scanned = fsb_scan(store["files"], torch.from_numpy(x), top)
            best = min(best, time.perf_counter() - begin)
        # float64 reference on the first file
        first = next(_fsb_chunks(store["files"][:1], k))[1]
        exact = topk(torch.from_numpy(x) @ torch.from_numpy(first.astype(np.float64)).T, top)
        head = fsb_scan(store["files"][:1], torch.from_numpy(x), top)[0]
        agree = float((head.indices == exact.indices).float().mean())
    finally:
        shutil.rmtree(workdir / "store-fsb", ignore_errors=True)
    return {
        "rows": scanned,
        "seconds": best,
        "rows_per_s": scanned / best,
        "scan_bytes_per_s": scanned * k * 2 / best,
        "bytes_on_disk_per_row": store["bytes_on_disk"] / rows,
        "top_agreement_with_float64": agree,
        "first_hit": int(result.indices[0, 0]),
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
