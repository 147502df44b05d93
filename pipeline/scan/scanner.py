"""The per-task scan of feature files: x (q, k) against every row, the top-k per query.

    I(z_i, q) = x_q^T phi_i                               (docs/method.md, the query step)

A task scores its files one after another (`score_files`): the float16 features are viewed in
place in the file's Parquet page (`pipeline.scan.pages`; no decode, no copy), screened
(`pipeline.scan.screen.exact_topk`: a float16 or float32 screen, then float64 scores of the few
rows that can reach the top-k - the float64 ranking exactly) and merged into the task's running
top-k; a file's hit columns (key, caption, metadata) are decoded only when one of its rows
enters it. Files of older layouts are decoded through Arrow, SCAN_ROWS rows at a time. Rows
carry a global id shard_index * 2^32 + row (shards in sorted id order), which breaks score ties
the same way the single-process engine does on features concatenated in that order.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ctrak.errors import ConfigError
from pipeline.feature_file import feature_norms, feature_view, parquet_batches
from pipeline.scan.pages import column_views
from pipeline.scan.screen import exact_topk

ROW_BITS = 32  # global id = shard_index << 32 | row
HIT_COLUMNS = ("key", "shard", "row", "caption", "metadata")
DICTIONARY_COLUMNS = ["shard", "caption", "metadata"]  # read as dictionaries: cheap to decode
SCAN_ROWS = 16384  # rows decoded and scored at a time: 32 MB of float16 at k = 1024


def global_ids(batch: pa.Table | pa.RecordBatch, shard_index: dict[str, int]) -> np.ndarray:
    """shard, row (n,) -> gid = shard_index[shard] << 32 | row (n,) int64."""
    shard = batch.column("shard")
    if isinstance(shard, pa.ChunkedArray):
        shard = shard.combine_chunks()
    if not pa.types.is_dictionary(shard.type):
        shard = pc.dictionary_encode(shard)  # a feature file reads it as one already
    index = np.array([shard_index[s] for s in shard.dictionary.to_pylist()], np.int64)
    which = np.asarray(shard.indices, np.int64)  # (n,)
    return index[which] << ROW_BITS | np.asarray(batch.column("row"), np.int64)


def score_block(
    batch: pa.Table | pa.RecordBatch, *, x: np.ndarray, top_k: int, shard_index: dict[str, int]
) -> pa.Table:
    """A block of feature rows (n,) and x (q, k) float64 -> its top-k rows per query, flattened:
    query, gid, score + the hit columns (q * min(top_k, n) rows). Scores and ranking are the
    float64 ones (ties by ascending gid, like the engine): a float32 screen of the stored
    rows, then a float64 rescore of the few that can reach the top-k (`pipeline.scan.screen`)."""
    gid = global_ids(batch, shard_index)  # (n,)
    norms = feature_norms(batch)  # (n,) or None (an older store)
    with warnings.catch_warnings():  # read-only views of the decoded block, never written
        warnings.simplefilter("ignore", UserWarning)
        phi = torch.from_numpy(feature_view(batch))  # (n, k) stored dtype
        norms = None if norms is None else torch.from_numpy(norms)
    best = exact_topk(phi, torch.tensor(x), top_k, torch.from_numpy(gid), norms)  # (q, m)
    q, m = best.indices.shape
    local = best.indices.reshape(-1).numpy()  # (q * m,) rows of the block
    picked = batch.select(list(HIT_COLUMNS)).take(pa.array(local, pa.int64()))  # (q * m,)
    return pa.table(
        {
            "query": np.repeat(np.arange(q), m),
            "gid": gid[local],
            "score": best.values.reshape(-1).numpy(),
            **{name: _plain(picked.column(name)) for name in HIT_COLUMNS},
        }
    )


def _plain(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A dictionary-encoded column (`shard` as read) decoded, so every block's table has the
    same schema."""
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def best_candidates(candidates: pa.Table, num_queries: int, top_k: int) -> list[pa.Table]:
    """Candidate rows (query, gid, score, ...) -> per query, its top-k rows in rank order:
    descending score, ties by ascending gid (`ctrak.topk`'s order; exact)."""
    query = np.asarray(candidates.column("query"), np.int64)  # (c,)
    score = np.asarray(candidates.column("score"), np.float64)  # (c,)
    gid = np.asarray(candidates.column("gid"), np.int64)  # (c,)
    order = np.lexsort((gid, -score, query))  # by query, then rank
    starts = np.searchsorted(query[order], np.arange(num_queries + 1))  # (q + 1,)
    counts = np.minimum(np.diff(starts), top_k)  # (q,)
    firsts = np.concatenate([order[a : a + c] for a, c in zip(starts[:-1], counts, strict=True)])
    best = candidates.take(pa.array(firsts, pa.int64()))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return [best.slice(a, c) for a, c in zip(offsets[:-1], counts, strict=True)]


def score_shard(
    blocks: Iterable[pa.RecordBatch], *, x: np.ndarray, top_k: int, shard_index: dict[str, int]
) -> pa.Table:
    """One shard's blocks (at least one) and x (q, k) -> its top-k rows per query (`score_block`
    per block, merged): query, gid, score + the hit columns."""
    parts = [score_block(b, x=x, top_k=top_k, shard_index=shard_index) for b in blocks]
    if len(parts) == 1:
        return parts[0]
    return pa.concat_tables(best_candidates(pa.concat_tables(parts), x.shape[0], top_k))


@dataclass(frozen=True)
class Floor:
    """The k-th row of each query in a running top-k: its score (q,) float64, -inf where the
    top-k holds fewer than k rows, and its gid (q,). A row enters only if it ranks above."""

    score: np.ndarray
    gid: np.ndarray

    @classmethod
    def of(cls, running: pa.Table, num_queries: int, top_k: int) -> Floor:
        """From a running top-k table (rows grouped by query in rank order)."""
        query = np.asarray(running.column("query"), np.int64)
        counts = np.bincount(query, minlength=num_queries)  # (q,)
        last = np.cumsum(counts) - 1  # the last row of each query's group
        full = counts >= top_k
        score = np.full(num_queries, -np.inf)
        gid = np.zeros(num_queries, np.int64)
        score[full] = np.asarray(running.column("score"), np.float64)[last[full]]
        gid[full] = np.asarray(running.column("gid"), np.int64)[last[full]]
        return cls(score, gid)

    def admits(self, query: np.ndarray, score: np.ndarray, gid: np.ndarray) -> np.ndarray:
        """Candidates (query, score, gid) (c,) -> (c,) bool: ranks above its query's k-th row
        (descending score, ties by ascending gid)."""
        kth, kth_gid = self.score[query], self.gid[query]
        return (score > kth) | ((score == kth) & (gid < kth_gid))


def score_file(
    data: bytes | pa.Buffer,
    *,
    x: np.ndarray,
    top_k: int,
    shard_index: dict[str, int],
    floor: Floor | None = None,
) -> pa.Table:
    """One feature file's bytes and x (q, k) -> its top-k rows per query (query, gid, score + the
    hit columns), less those that cannot enter the running top-k of the files scored before
    (`floor`, its k-th rows). The features are read in place from the Parquet pages
    (`pipeline.scan.pages`) and all the file's rows screened at once (`exact_topk`);
    the hit columns are decoded only when a row survives; only `shard` and `row` (the ids) are
    decoded for every file.
    Other layouts (older stores) decode through Arrow in blocks of SCAN_ROWS rows
    (`score_shard`)."""
    parquet = pq.ParquetFile(pa.BufferReader(data), read_dictionary=DICTIONARY_COLUMNS)
    pages, norms, rows = column_views(data, parquet, "feature", "feature_norm", "row")
    shard = _constant(parquet, "shard")
    if not pages or norms is None or rows is None or shard is None:  # another layout, no rows
        return score_shard(
            parquet_batches(data, SCAN_ROWS), x=x, top_k=top_k, shard_index=shard_index
        )
    gid = shard_index[shard] << ROW_BITS | np.concatenate(rows)  # (n,) int64
    with warnings.catch_warnings():  # read-only views of the file's bytes, never written
        warnings.simplefilter("ignore", UserWarning)
        # torch needs its values aligned: a page that is not (an older writer) is copied
        blocks = [torch.from_numpy(p if p.flags.aligned else p.copy()) for p in pages]
        norms = torch.from_numpy(np.concatenate(norms))  # (n,) float32, a copy
    kth = None if floor is None else torch.from_numpy(floor.score)
    ids = torch.from_numpy(gid)
    best = exact_topk(blocks, torch.from_numpy(x), top_k, ids, norms, floor=kth)
    q, m = best.indices.shape
    local = best.indices.reshape(-1).numpy()  # (q * m,) rows of the file
    query, score = np.repeat(np.arange(q), m), best.values.reshape(-1).numpy()
    if floor is not None:
        keep = floor.admits(query, score, gid[local])
        local, query, score = local[keep], query[keep], score[keep]
    if local.size == 0:
        return _EMPTY_HITS
    names = [n for n in HIT_COLUMNS if n not in ("shard", "row")]
    picked = parquet.read(columns=names, use_threads=False).take(pa.array(local, pa.int64()))
    columns = {name: _plain(picked.column(name)) for name in names}
    return pa.table(
        {
            "query": query,
            "gid": gid[local],
            "score": score,
            **columns,
            "shard": pa.array([shard] * local.size, pa.string()),
            "row": gid[local] & ((1 << ROW_BITS) - 1),
        }
    ).select(["query", "gid", "score", *HIT_COLUMNS])


_EMPTY_HITS = pa.table(
    {
        "query": pa.array([], pa.int64()),
        "gid": pa.array([], pa.int64()),
        "score": pa.array([], pa.float64()),
        **{n: pa.array([], pa.int64() if n == "row" else pa.string()) for n in HIT_COLUMNS},
    }
)


def _constant(parquet: pq.ParquetFile, name: str) -> str | None:
    """The one value of string column `name` in every row, from the row groups' statistics
    (None: no statistics, or more than one value)."""
    index = parquet.schema_arrow.get_field_index(name)
    values = set()
    for g in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(g).column(index).statistics
        if stats is None or not stats.has_min_max or stats.null_count != 0:
            return None
        values.update((stats.min, stats.max))
    return values.pop() if len(values) == 1 and isinstance(next(iter(values)), str) else None


def score_files(
    files: Iterable[bytes | pa.Buffer], *, x: np.ndarray, top_k: int, shard_index: dict[str, int]
) -> pa.Table:
    """Feature files' bytes, one after another -> the top-k rows per query over all of them
    (`score_file` each against the running top-k, merged as it goes; exact)."""
    running, floor = None, None
    for data in files:
        part = score_file(data, x=x, top_k=top_k, shard_index=shard_index, floor=floor)
        del data  # the source may free the bytes before it reads the next file
        if running is not None and part.num_rows == 0:
            continue  # nothing of this file enters the running top-k
        both = part if running is None else pa.concat_tables([running, part])
        running = pa.concat_tables(best_candidates(both, x.shape[0], top_k))
        floor = Floor.of(running, x.shape[0], top_k)
    if running is None:
        raise ConfigError("score_files needs at least one feature file")
    return running


def gather(candidates: pa.Table, num_queries: int, top_k: int) -> list[list[dict]]:
    """Per-block candidates -> per query, the global top-k rows in rank order."""
    return [rows.to_pylist() for rows in best_candidates(candidates, num_queries, top_k)]
