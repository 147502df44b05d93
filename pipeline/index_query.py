"""Query through the vector index: scatter over index shards, gather, rescore exactly.

    x (q, k) float64 = (K + lambda I)^-1 g, solved once per query (`pipeline.query`)
    1. scatter: each index shard searched in a Ray task (FAISS, inner product, nprobe lists)
       for its `rescore` best candidates per query by the approximate score;
    2. gather: the driver keeps the `rescore` best per query over all index shards;
    3. rescore: one Ray task per feature shard holding candidates reads that file through its
       done-marker (size + sha256 checked, and the sha256 the index recorded), views its
       float16 rows in place (`pipeline.scan.pages`) and scores the candidate rows in float64 with
       `ctrak.kernel.scores` - the exact scan's own rescoring, so a returned score equals the
       exact scan's bit for bit - and decodes their hit columns;
    4. the top-k of the rescored rows in `ctrak.topk`'s order (`pipeline.query.gather`).

The returned top-k equals the exact scan's whenever the exact top-k rows are among the
candidates: always at nprobe = nlist with rescore >= top_k on flat codes, and in measured
proportion (recall@k, docs/bench-index.md) otherwise. A worker keeps the index shards it
loaded in memory (`_LOADED`, by sha256), so a later query in that worker skips the read.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ctrak.kernel import scores
from pipeline.config import StorageConfig
from pipeline.errors import StaleIndexError
from pipeline.index import ROW_BITS, check_index, file_features, from_bytes, read_verified
from pipeline.store import FeatureStore, ShardEntry

CACHED_SHARDS = 64  # index shards a worker keeps loaded
_LOADED: OrderedDict[str, object] = OrderedDict()  # sha256 -> faiss index, per process


def default_rescore(top_k: int) -> int:
    """Candidates per query rescored exactly: 10 top_k, at least 100 (docs/bench-index.md)."""
    return max(10 * top_k, 100)


def load_shard(store: FeatureStore, record: dict):
    """An index shard (verified against index.json), from this process's memory if loaded."""
    index = _LOADED.get(record["sha256"])
    if index is None:
        index = from_bytes(read_verified(store, record, f"index shard {record['id']}"))
        _LOADED[record["sha256"]] = index
        while len(_LOADED) > CACHED_SHARDS:
            _LOADED.popitem(last=False)
    _LOADED.move_to_end(record["sha256"])
    return index


def search(index, x: np.ndarray, nprobe: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """x (q, k) -> (approximate scores (q, count) float32, ids (q, count) int64; -1 where the
    probed lists hold fewer rows) of one FAISS IVF index searched over nprobe lists."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = min(nprobe, ivf.nlist)
    return index.search(np.ascontiguousarray(x, np.float32), count)


def search_groups(
    batch: dict[str, np.ndarray],
    *,
    store_uri: str,
    storage: StorageConfig,
    records: dict[str, dict],
    x: np.ndarray,
    nprobe: int,
    count: int,
    threads: int = 1,
) -> pa.Table:
    """Ray Data fn: index shard ids (n,) -> their candidates: query, shard, row, approx (the
    `count` best per query and index shard)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    store = FeatureStore(store_uri, storage)
    parts = []
    for group in (str(g) for g in batch["group"]):
        record = records[group]
        approx, ids = search(load_shard(store, record), x, nprobe, count)
        query, slot = np.nonzero(ids >= 0)
        label = ids[query, slot]
        names = np.array([shard for shard, _ in record["features"]], dtype=object)
        parts.append(
            pa.table(
                {
                    "query": query.astype(np.int64),
                    "shard": pa.array(names[label >> ROW_BITS], pa.string()),
                    "row": label & ((1 << ROW_BITS) - 1),
                    "approx": approx[query, slot].astype(np.float64),
                }
            )
        )
    return pa.concat_tables(parts)


def best_approx(candidates: pa.Table, count: int) -> pa.Table:
    """Per query, the `count` candidates with the highest approximate score (ties by shard,
    row: deterministic)."""
    query = np.asarray(candidates.column("query"), np.int64)
    approx = np.asarray(candidates.column("approx"), np.float64)
    row = np.asarray(candidates.column("row"), np.int64)
    shard = np.asarray(candidates.column("shard").to_pylist(), dtype=object)
    order = np.lexsort((row, shard, -approx, query))
    ranked = query[order]
    first = np.searchsorted(ranked, ranked, side="left")
    keep = order[np.arange(len(order)) - first < count]
    return candidates.take(pa.array(np.sort(keep), pa.int64()))


def rescore_file(
    data: bytes | pa.Buffer, rows: np.ndarray, x: np.ndarray, shard: str, gid_base: int
) -> pa.Table:
    """A feature file's bytes, candidate rows (c,) ascending, x (q, k) float64 -> their exact
    float64 scores for every query (q * c rows): query, gid, score + the hit columns."""
    from pipeline.scan.scanner import HIT_COLUMNS, _plain

    blocks = file_features(data)
    starts = np.cumsum([0] + [len(b) for b in blocks])
    which = np.searchsorted(starts, rows, side="right") - 1  # (c,) block of each row
    phi = np.stack([blocks[b][r - starts[b]] for b, r in zip(which, rows, strict=True)])
    s64 = scores(torch.from_numpy(phi.astype(np.float32)), torch.from_numpy(x)).numpy()  # (q, c)
    q, c = s64.shape
    names = [n for n in HIT_COLUMNS if n not in ("shard", "row")]
    parquet = pq.ParquetFile(pa.BufferReader(data))
    picked = parquet.read(columns=names, use_threads=False).take(pa.array(rows, pa.int64()))
    repeat = pa.array(np.tile(np.arange(c), q), pa.int64())
    return pa.table(
        {
            "query": np.repeat(np.arange(q), c),
            "gid": np.tile(gid_base << ROW_BITS | rows, q),
            "score": s64.reshape(-1),
            **{n: _plain(picked.column(n)).take(repeat) for n in names},
            "shard": pa.array([shard] * (q * c), pa.string()),
            "row": np.tile(rows, q),
        }
    ).select(["query", "gid", "score", *HIT_COLUMNS])


def rescore_shards(
    batch: dict[str, np.ndarray],
    *,
    store_uri: str,
    storage: StorageConfig,
    wanted: dict[str, np.ndarray],
    indexed: dict[str, str],
    x: np.ndarray,
    shard_index: dict[str, int],
) -> pa.Table:
    """Ray Data fn: feature shard ids (n,) -> their candidates' exact scores (`rescore_file`).
    Each file is read through its marker and must be the one the index was built from."""
    store = FeatureStore(store_uri, storage)
    shards = [str(s) for s in batch["shard"]]
    entries = store.entries(shards)
    parts = []
    for shard in shards:
        entry: ShardEntry = entries[shard]
        if entry.files["features"]["sha256"] != indexed[shard]:
            raise StaleIndexError(
                f"feature file features/{shard}.parquet of {store_uri} was replaced after "
                "indexing; run `ctrak index` with this store to rebuild the index"
            )
        data = store.read_file(entry, "features")
        parts.append(rescore_file(data, wanted[shard], x, shard, shard_index[shard]))
    return pa.concat_tables(parts)


def index_scan(
    store: FeatureStore,
    info: dict,
    x: np.ndarray,
    *,
    shard_ids: list[str],
    nprobe: int | None = None,
    rescore: int,
) -> tuple[pa.Table, dict]:
    """x (q, k) float64 -> (rescored candidates in `pipeline.query.score_shards`' format,
    run info): steps 1-3 of the module docstring, on Ray. `shard_ids`: the store's finished
    shards in the exact scan's order (their positions make the gids)."""
    nprobe = int(nprobe or info["nprobe"])
    groups = info["groups"]
    records = {g["id"]: g for g in groups}
    # 1. scatter over the index shards
    found = _scatter(
        [{"group": g["id"]} for g in groups],
        search_groups,
        store_uri=store.uri,
        storage=store.storage,
        records=records,
        x=x,
        nprobe=nprobe,
        count=rescore,
    )
    # 2. gather: the best `rescore` per query
    best = best_approx(found, rescore)
    shard = np.asarray(best.column("shard").to_pylist(), dtype=object)
    row = np.asarray(best.column("row"), np.int64)
    wanted = {s: np.unique(row[shard == s]) for s in sorted(set(shard))}
    # 3. rescore exactly, one task per feature shard with candidates
    indexed = {s: d for g in groups for s, d in g["features"]}
    scored = _scatter(
        [{"shard": s} for s in wanted],
        rescore_shards,
        store_uri=store.uri,
        storage=store.storage,
        wanted=wanted,
        indexed=indexed,
        x=x,
        shard_index={s: i for i, s in enumerate(shard_ids)},
    )
    scored = _own_candidates(scored, best)
    run = {
        "index": {
            "factory": info["factory"],
            "nlist": info["nlist"],
            "nprobe": nprobe,
            "rescored_per_query": rescore,
            "index_shards": len(groups),
            "feature_shards_read": len(wanted),
        }
    }
    return scored, run


def _own_candidates(scored: pa.Table, best: pa.Table) -> pa.Table:
    """The rescored rows (every query x every candidate row of a file) -> only each query's
    own candidates, so a query's answer does not depend on what it was asked with."""
    pairs = set(
        zip(
            best.column("query").to_pylist(),
            best.column("shard").to_pylist(),
            best.column("row").to_pylist(),
            strict=True,
        )
    )
    keys = zip(
        scored.column("query").to_pylist(),
        scored.column("shard").to_pylist(),
        scored.column("row").to_pylist(),
        strict=True,
    )
    keep = [i for i, key in enumerate(keys) if key in pairs]
    return scored.take(pa.array(keep, pa.int64()))


def check_current(store: FeatureStore, info: dict) -> None:
    """check_index against the store's finished shards now."""
    check_index(store, info, store.entries())


def _scatter(items: list[dict], fn, **kwargs) -> pa.Table:
    """One Ray Data task per item (`fn(batch_of_one_item, **kwargs)`), results concatenated
    on the driver; named errors of the tasks reach the caller as themselves."""
    import ray

    from pipeline.cluster import named_errors

    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn, batch_size=1, fn_kwargs=kwargs
    )
    with named_errors():
        return pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
