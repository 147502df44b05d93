"""The store's vector index (real FAISS, the session Ray cluster, a real S3 server): after the
exact rescore its top-k equals a dense float64 top-k of the stored features where recall is 1
by construction (flat codes, nprobe = nlist); recall falls off gracefully as nprobe falls;
reindex adds only the new shards (old index shards' bytes unchanged); a store changed after
indexing is refused with StaleIndexError until the index is rebuilt; same on S3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctrak.kernel import scores
from ctrak.topk import topk
from pipeline.errors import StaleIndexError
from pipeline.feature_file import table_features
from pipeline.fisher import update_fisher
from pipeline.index import IndexSpec, build_index, update_index
from pipeline.index_query import check_current, index_scan
from pipeline.scan.scanner import best_candidates
from pipeline.shards import ShardRef
from pipeline.store import FeatureStore

K, ROWS, TOP = 32, 300, 5


def _features(shard: int, seed: int = 0) -> np.ndarray:
    """(ROWS, K) rows around 8 shared centres: an index over clusters, not white noise."""
    centres = np.random.default_rng(99).standard_normal((8, K)) * 3
    rng = np.random.default_rng([seed, shard])
    return (centres[rng.integers(0, 8, ROWS)] + rng.standard_normal((ROWS, K))).astype(np.float32)


def _write(store: FeatureStore, shard: int, seed: int = 0) -> None:
    sid = f"{shard:05d}"
    columns = {
        "row": np.arange(ROWS),
        "key": [f"{sid}-{r}" for r in range(ROWS)],
        "caption": ["a red circle"] * ROWS,
        "metadata": ['{"i": 1}'] * ROWS,
    }
    store.write_shard(
        ShardRef(sid, f"data/{sid}.tar", shard), columns, _features(shard, seed), [], "float16"
    )


def _store(uri: str, shards: int, storage=None) -> FeatureStore:
    store = FeatureStore(uri, storage)
    store.open({"projection_k": K, "test": "index"}, "float16", create=True)
    for s in range(shards):
        _write(store, s)
    update_fisher(store, 1.0)
    return store


def _dense_topk(store: FeatureStore, x: np.ndarray, k: int) -> list[list[tuple[str, int, float]]]:
    """The independent reference: float64 scores of all stored rows, in shard order."""
    entries = sorted(store.entries().items())
    tables = [store.read_features(e) for _, e in entries]
    phi = torch.cat([torch.from_numpy(table_features(t)) for t in tables]).float()
    where = [(s, r) for (s, _), t in zip(entries, tables, strict=True) for r in range(t.num_rows)]
    best = topk(scores(phi, torch.from_numpy(x)), k)
    return [
        [(*where[i], v) for i, v in zip(idx, val, strict=True)]
        for idx, val in zip(best.indices.tolist(), best.values.tolist(), strict=True)
    ]


def _index_topk(store: FeatureStore, x: np.ndarray, k: int, **kwargs) -> list[list[tuple]]:
    from pipeline.index import require_index

    info = require_index(store)
    check_current(store, info)
    found, _ = index_scan(store, info, x, shard_ids=store.done_ids(), **kwargs)
    return [
        [(h["shard"], h["row"], h["score"]) for h in t.to_pylist()]
        for t in best_candidates(found, x.shape[0], k)
    ]


def _queries(q: int = 4) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((q, K))


def test_index_equals_exact_then_degrades_gracefully(tmp_path, ray_cluster):
    store = _store(str(tmp_path / "store"), 4)
    info = build_index(store, IndexSpec(codes="flat", nlist=16, group_shards=2))
    assert info["factory"] == "IVF16,Flat" and len(info["groups"]) == 2
    x = _queries(8)
    exact = _dense_topk(store, x, TOP)
    every = [{(s, r): v for s, r, v in q} for q in _dense_topk(store, x, 4 * ROWS)]
    # 1. nprobe = nlist: every row is a candidate; the rescored top-k IS the exact one
    assert _index_topk(store, x, TOP, nprobe=16, rescore=TOP) == exact
    # 2. fewer lists: recall@k never rises as nprobe falls, and does fall
    recall = {}
    for nprobe in (16, 8, 4, 2, 1):
        got = _index_topk(store, x, TOP, nprobe=nprobe, rescore=TOP)
        hits = [
            len({h[:2] for h in g} & {e[:2] for e in e_}) for g, e_ in zip(got, exact, strict=True)
        ]
        recall[nprobe] = sum(hits) / (TOP * len(x))
        for g, full in zip(got, every, strict=True):  # whatever is returned: its exact score
            assert all(full[(shard, row)] == score for shard, row, score in g)
    values = [recall[n] for n in (16, 8, 4, 2, 1)]
    assert values[0] == 1.0 and values == sorted(values, reverse=True) and values[-1] < 1.0


def test_scores_are_the_exact_ones_with_pq_codes(tmp_path, ray_cluster):
    store = _store(str(tmp_path / "store"), 2)
    info = build_index(store, IndexSpec(codes="pq"))
    assert ",PQ2x" in info["factory"]
    x = _queries(3)
    exact = _dense_topk(store, x, 2 * ROWS)
    got = _index_topk(store, x, TOP, nprobe=info["nlist"], rescore=2 * ROWS)
    assert got == [e[:TOP] for e in exact]  # every row rescored: the exact top-k, same bits


def test_reindex_adds_only_new_shards_and_stale_index_is_refused(tmp_path, ray_cluster):
    store = _store(str(tmp_path / "store"), 3)
    info = build_index(store, IndexSpec(codes="flat", nlist=8, group_shards=2))
    old = {g["path"]: store.read(store.path(g["path"])) for g in info["groups"]}
    # 1. a shard added after indexing: refused, naming it
    _write(store, 3)
    update_fisher(store, 1.0)
    with pytest.raises(StaleIndexError, match=r"00003 added after indexing.*ctrak reindex"):
        _index_topk(store, _queries(), TOP, nprobe=8, rescore=TOP)
    # 2. reindex: one new index shard holding only the new shard's rows; old bytes unchanged
    info = update_index(store)
    assert info["added_shards"] == 1 and len(info["groups"]) == 3
    new = info["groups"][-1]
    assert new["features"][0][0] == "00003" and len(new["features"]) == 1 and new["rows"] == ROWS
    assert {p: store.read(store.path(p)) for p in old} == old
    assert update_index(store)["added_shards"] == 0
    x = _queries()
    assert _index_topk(store, x, TOP, nprobe=8, rescore=TOP) == _dense_topk(store, x, TOP)
    # 3. a feature file replaced: refused (query and reindex) until `ctrak index` reruns
    _write(store, 1, seed=5)
    update_fisher(store, 1.0)
    with pytest.raises(StaleIndexError, match=r"replaced since indexing: features/00001\.parquet"):
        _index_topk(store, x, TOP, nprobe=8, rescore=TOP)
    with pytest.raises(StaleIndexError, match="ctrak index"):
        update_index(store)
    build_index(store, IndexSpec(codes="flat", nlist=8, group_shards=2))
    assert _index_topk(store, x, TOP, nprobe=8, rescore=TOP) == _dense_topk(store, x, TOP)


def test_index_on_s3(s3_server, s3_storage, ray_cluster):
    uri = f"s3://{s3_server.bucket}/index-test"
    store = _store(uri, 2, s3_storage)
    info = build_index(store, IndexSpec(codes="sq16", nlist=4, group_shards=1))
    assert store.has(store.path("index", "index.json")) and len(info["groups"]) == 2
    x = _queries()
    assert _index_topk(store, x, TOP, nprobe=4, rescore=TOP) == _dense_topk(store, x, TOP)


def test_memory_index_as_eval_uses_it():
    from pipeline.index_memory import MemoryIndex, recall

    phi = torch.from_numpy(np.concatenate([_features(s) for s in range(2)])).to(torch.float16)
    x = torch.from_numpy(_queries(6))
    exact = topk(scores(phi.float(), x), TOP)
    searcher = MemoryIndex(phi, IndexSpec(codes="pq"))
    full = searcher.topk(x, TOP, nprobe=searcher.nlist, rescore=len(phi))
    assert torch.equal(full.values, exact.values) and torch.equal(full.indices, exact.indices)
    few = searcher.topk(x, TOP, nprobe=1, rescore=TOP)  # one list, no margin: rows are missed
    values = recall(few.indices, exact.indices)
    assert len(values) == 6 and min(values) >= 0 and np.mean(values) < 1
