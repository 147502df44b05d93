"""The store's vector index: FAISS IVF shards over the raw phi_i, their provenance, their build.

A query scores I(z_i, q) = x_q^T phi_i with x_q = (K + lambda I)^-1 g_q: a maximum-inner-
product search of x_q over the stored phi_i. The index holds the raw phi_i, so a Fisher refit
(a new K, another damping) changes only x_q, never the index.

    <store>/index/trained.faiss      the trained, empty IVF index (coarse centroids + codebooks)
    <store>/index/shards/<g>.faiss   index shard g: the rows of one group of feature shards,
                                     id = position of the shard in the group << 32 | row
    <store>/index/index.json         the marker, written LAST: FAISS factory string, nlist,
                                     nprobe default, the store provenance it was built under,
                                     and per index shard its sha256, bytes, rows and the
                                     feature shards it covers with their feature files' sha256

1. training: `train_rows` rows sampled (seeded) from up to SAMPLE_SHARDS feature shards, one
   Ray task; the trained empty index is stored once, so every index shard - built now or
   added by `ctrak reindex` later - shares its centroids and codebooks;
2. encoding: one Ray task per group of `group_shards` feature shards (each read through its
   done-marker, size and sha256 checked) adds their rows to a copy of the trained index and
   writes one index shard;
3. the marker. A reindex (`update_index`) encodes only the feature shards no index shard
   covers, as new index shards; the old ones are not rewritten (their bytes stay the same).

Codes (`IndexSpec.codes`): "sq4" (default: 4 bits per dimension, k/2 bytes per row), "sq8"
(k bytes), "sq16" (float16, 2k bytes), "pq" (product quantizer, k/16 bytes) or "flat"
(float32, 4k bytes). Chosen by recall@10 on the dev queries of a mixture fitted to real
features, then bytes (docs/bench-index.md): sq4, sq8, sq16 and flat recall alike; pq and
4-bit fast-scan PQ miss half the top-10 - the solved query x = (K + lambda I)^-1 g weights the
directions of least variance most, which a product quantizer fitted to phi codes worst.
A query refuses an index that does not match the store (`check_index`): StaleIndexError names
the shard added, replaced or removed, or the setting that differs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ctrak.errors import ConfigError
from pipeline.errors import IndexNotFoundError, StaleIndexError, StoreCorruptError
from pipeline.feature_file import feature_view
from pipeline.scan.pages import column_views
from pipeline.storage import sha256
from pipeline.store import FeatureStore, ShardEntry

FORMAT = "ctrak-vector-index/1"
CODES = ("sq4", "sq8", "sq16", "pq", "flat")
ROW_BITS = 32  # index id = position of the feature shard in its group << 32 | row
SAMPLE_SHARDS = 64  # training rows come from at most this many feature shards
ADD_ROWS = 65536  # rows converted to float32 and added at a time


@dataclass(frozen=True)
class IndexSpec:
    """How to build: codes, nlist (None: `choose_nlist`), nprobe default (None:
    `default_nprobe`), feature shards per index shard, training sample size and seed."""

    codes: str = "sq4"
    nlist: int | None = None
    nprobe: int | None = None
    group_shards: int = 16
    train_rows: int = 65536
    seed: int = 0

    def check(self) -> None:
        if self.codes not in CODES:
            raise ConfigError(f"index codes {self.codes!r}: choose one of {list(CODES)}")
        for name in ("nlist", "nprobe", "group_shards", "train_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"index {name}={value!r} must be a positive integer")


def choose_nlist(rows: int, train_rows: int) -> int:
    """The inverted lists: the largest power of two <= sqrt(rows) / 2 that leaves >= 39
    training rows per list (FAISS's k-means minimum), at least 1."""
    limit = min(math.sqrt(rows) / 2, min(rows, train_rows) / 39)
    return 1 << max(math.floor(math.log2(max(limit, 1))), 0)


def default_nprobe(nlist: int) -> int:
    """Lists searched per query: all of them. Rule, set before the numbers: the largest
    power-of-two fraction of nlist whose per-query recall@10 on dev queries (seed 5000) is
    >= 0.95. The synthetic mixture store's dev queries gave nlist / 4 (0.956), toy-paper's real
    eval dev queries only nlist (nlist / 2: 0.725, nlist / 4: 0.484): the solved query is
    whitened by the inverse Fisher and the lists are of raw phi (docs/bench-index.md). A
    default must hold on both, so the index prunes no lists unless asked (`--nprobe`); it
    still scans k/2 bytes per row instead of 2k and skips the feature files' sha256."""
    return nlist


def pq_shape(k: int, train_rows: int) -> tuple[int, int]:
    """(sub-quantizers m, bits each) of the PQ codes: m = the largest divisor of k <= k / 16
    (16-dimensional sub-vectors), 8 bits when the sample trains 256 centroids with >= 39 rows
    each, fewer on small stores."""
    m = max(d for d in range(1, max(k // 16, 1) + 1) if k % d == 0)
    bits = int(min(8, max(1, math.floor(math.log2(max(train_rows / 39, 2))))))
    return m, bits


def factory_string(k: int, nlist: int, codes: str, train_rows: int) -> str:
    """The FAISS index_factory string of an IVF index over k dimensions."""
    if codes == "pq":
        m, bits = pq_shape(k, train_rows)
        return f"IVF{nlist},PQ{m}x{bits}"
    return f"IVF{nlist},{ {'sq4': 'SQ4', 'sq8': 'SQ8', 'sq16': 'SQfp16', 'flat': 'Flat'}[codes] }"


def to_bytes(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes):
    import faiss

    return faiss.deserialize_index(np.frombuffer(data, np.uint8))


def file_features(data: bytes | pa.Buffer) -> list[np.ndarray]:
    """A feature file's bytes -> its features as row blocks (n_i, k) in the stored dtype: the
    Parquet pages viewed in place (`pipeline.scan.pages`), else decoded through Arrow."""
    parquet = pq.ParquetFile(pa.BufferReader(data))
    (pages,) = column_views(data, parquet, "feature")
    if pages is not None:
        return pages
    return [feature_view(parquet.read(columns=["feature"], use_threads=False))]


def train(sample: np.ndarray, factory: str, threads: int = 1) -> bytes:
    """Training rows (n, k) -> the trained, empty index (inner product) as bytes."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, np.float32))
    return to_bytes(index)


def encode(trained: bytes, parts: list[list[np.ndarray]], threads: int = 1) -> bytes:
    """The trained index + the row blocks of each feature shard of a group (in group order)
    -> the index shard's bytes: every row added with id = position << 32 | row."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = from_bytes(trained)
    for position, blocks in enumerate(parts):
        row = 0
        for block in blocks:
            for start in range(0, block.shape[0], ADD_ROWS):
                rows = np.asarray(block[start : start + ADD_ROWS], np.float32)
                ids = np.int64(position) << ROW_BITS | np.arange(row, row + len(rows))
                index.add_with_ids(rows, ids)
                row += len(rows)
    return to_bytes(index)


# ---- provenance ----------------------------------------------------------------------------
def index_info(store: FeatureStore) -> dict | None:
    """index/index.json, or None when the store has no index."""
    path = store.path("index", "index.json")
    return store.read_json(path) if store.has(path) else None


def require_index(store: FeatureStore) -> dict:
    info = index_info(store)
    if info is None:
        raise IndexNotFoundError(
            f"the store {store.uri} has no vector index (index/index.json): run `ctrak index` "
            "with this store, or query without --index (the exact scan)"
        )
    if info.get("format") != FORMAT:
        raise StaleIndexError(
            f"{store.uri}/index/index.json is format {info.get('format')!r}, not {FORMAT}: "
            "run `ctrak index` with this store to rebuild it"
        )
    return info


def covered(info: dict) -> dict[str, str]:
    """{feature shard: its feature file's sha256} of every shard the index covers."""
    return {shard: digest for group in info["groups"] for shard, digest in group["features"]}


def _identity(meta: dict) -> dict:
    return {"provenance": meta["provenance"], "feature_dtype": meta["feature_dtype"]}


def check_index(store: FeatureStore, info: dict, entries: dict[str, ShardEntry]) -> None:
    """Refuse an index that is not exactly of the store's finished feature files, or was built
    under other store settings: StaleIndexError naming every difference and the fix."""
    fix = "run `ctrak index` with this store to rebuild the index"
    problems = []
    stored, actual = info["store"], json.loads(json.dumps(_identity(store.metadata())))
    for key in sorted(set(stored["provenance"]) | set(actual["provenance"])):
        was, now = stored["provenance"].get(key), actual["provenance"].get(key)
        if was != now:
            problems.append(f"store setting {key}: index built under {was!r}, store has {now!r}")
    if stored["feature_dtype"] != actual["feature_dtype"]:
        problems.append(f"feature_dtype {stored['feature_dtype']} vs {actual['feature_dtype']}")
    have = covered(info)
    current = {s: e.files["features"]["sha256"] for s, e in entries.items()}
    added = sorted(set(current) - set(have))
    if added and not problems:
        fix = "run `ctrak reindex` (adds them to the index) or `ctrak index`"
    if added:
        problems.append(f"feature shard(s) {_few(added)} added after indexing (not in the index)")
    replaced = sorted(s for s in set(have) & set(current) if have[s] != current[s])
    if replaced:
        fix = "run `ctrak index` with this store to rebuild the index"
        problems.append(
            "feature file(s) replaced since indexing: "
            + ", ".join(f"features/{s}.parquet" for s in replaced[:5])
            + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
        )
    removed = sorted(set(have) - set(current))
    if removed:
        fix = "run `ctrak index` with this store to rebuild the index"
        problems.append(f"indexed shard(s) {_few(removed)} no longer finished in the store")
    if problems:
        raise StaleIndexError(
            f"the vector index of {store.uri} does not match the store - "
            + "; ".join(problems)
            + f". Fix: {fix}, or query without --index (the exact scan)"
        )


def _few(ids: list[str]) -> str:
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def read_verified(store: FeatureStore, record: dict, what: str) -> bytes:
    """An index file (the trained index, a shard) checked against the size and sha256 that
    index.json records; StoreCorruptError otherwise."""
    data = store.read(store.path(record["path"]))
    if len(data) != record["bytes"] or sha256(data) != record["sha256"]:
        raise StoreCorruptError(
            f"{store.uri}/{record['path']} ({what}) does not match the checksum in "
            "index/index.json (truncated or altered); run `ctrak index` with this store to "
            "rebuild the index"
        )
    return data


# ---- the build (Ray tasks) -------------------------------------------------------------------
def _sample(store: FeatureStore, shards: list[str], rows: int, seed: int) -> np.ndarray:
    """Up to `rows` training rows (n, k) float32 from a seeded choice of shards."""
    rng = np.random.default_rng(seed)
    order = [shards[i] for i in rng.permutation(len(shards))]
    per = -(-rows // min(len(shards), SAMPLE_SHARDS))
    entries, taken, count = store.entries(order[:SAMPLE_SHARDS]), [], 0
    for shard in order[:SAMPLE_SHARDS]:
        phi = np.concatenate(file_features(store.read_file(entries[shard], "features")))
        pick = np.sort(rng.choice(len(phi), min(per, len(phi), rows - count), replace=False))
        taken.append(phi[pick].astype(np.float32))
        count += len(pick)
        if count >= rows:
            break
    return np.concatenate(taken)


def _train_task(uri: str, storage, spec: IndexSpec, shards: list[str], total: int) -> dict:
    """Ray task: sample, choose nlist and the factory, train, store trained.faiss."""
    store = FeatureStore(uri, storage)
    sample = _sample(store, shards, min(spec.train_rows, total), spec.seed)
    nlist = spec.nlist or choose_nlist(total, len(sample))
    factory = factory_string(sample.shape[1], nlist, spec.codes, len(sample))
    data = train(sample, factory)
    relative = "index/trained.faiss"
    store.write(store.path(relative), data)
    return {
        "factory": factory,
        "nlist": nlist,
        "sample_rows": len(sample),
        "trained": {"path": relative, "sha256": sha256(data), "bytes": len(data)},
    }


def _encode_task(uri: str, storage, trained: dict, group: str, shards: list[str]) -> dict:
    """Ray task: index shard `group` of feature shards `shards` (each verified), written."""
    store = FeatureStore(uri, storage)
    entries = store.entries(shards)
    parts, digests, rows = [], [], 0
    for shard in shards:
        data = store.read_file(entries[shard], "features")
        parts.append(file_features(data))
        digests.append([shard, entries[shard].files["features"]["sha256"]])
        rows += sum(len(b) for b in parts[-1])
    out = encode(read_verified(store, trained, "trained index"), parts)
    relative = f"index/shards/{group}.faiss"
    store.write(store.path(relative), out)
    return {
        "id": group,
        "path": relative,
        "sha256": sha256(out),
        "bytes": len(out),
        "rows": rows,
        "features": digests,
    }


def _encode_groups(store: FeatureStore, trained: dict, shards: list[str], first: int, size: int):
    """One Ray task per group of `size` shards, numbered from `first` -> their records."""
    import ray

    from pipeline.cluster import named_errors

    task = ray.remote(max_retries=0)(_encode_task)
    groups = [shards[i : i + size] for i in range(0, len(shards), size)]
    refs = [
        task.remote(store.uri, store.storage, trained, f"{first + j:05d}", group)
        for j, group in enumerate(groups)
    ]
    with named_errors():
        return ray.get(refs)


def _write_info(store: FeatureStore, info: dict) -> None:
    body = json.dumps(info, indent=1, sort_keys=True) + "\n"
    store.write(store.path("index", "index.json"), body.encode())


def build_index(store: FeatureStore, spec: IndexSpec) -> dict:
    """Train and encode the index of every finished feature shard (Ray tasks), then write
    index/index.json last; returns it. Replaces any index the store had."""
    from pipeline.cluster import remote_call

    spec.check()
    meta, entries = store.metadata(), store.entries()
    if not entries:
        raise ConfigError(f"the store {store.uri} has no finished shard to index")
    shards, total = sorted(entries), sum(e.rows for e in entries.values())
    trained = remote_call(_train_task, store.uri, store.storage, spec, shards, total)
    groups = _encode_groups(store, trained["trained"], shards, 0, spec.group_shards)
    info = {
        "format": FORMAT,
        "metric": "inner_product",
        "k": int(meta["k"]),
        **trained,
        "nprobe": spec.nprobe or default_nprobe(trained["nlist"]),
        "spec": asdict(spec),
        "store": _identity(meta),
        "rows": total,
        "groups": groups,
    }
    _write_info(store, info)
    return info


def update_index(store: FeatureStore, entries: dict[str, ShardEntry] | None = None) -> dict:
    """Add the finished feature shards no index shard covers, as new index shards (the old
    ones untouched), then rewrite index.json. StaleIndexError when an indexed shard was
    replaced or removed, or the store settings differ (that needs `ctrak index`)."""
    info = require_index(store)
    entries = store.entries() if entries is None else entries
    new = sorted(set(entries) - set(covered(info)))
    known = {s: e for s, e in entries.items() if s not in new}
    check_index(store, info, known)  # everything but the new shards must match
    if not new:
        return {**info, "added_shards": 0}
    first = max((int(g["id"]) for g in info["groups"]), default=-1) + 1
    size = int(info["spec"]["group_shards"])
    groups = _encode_groups(store, info["trained"], new, first, size)
    info = {
        **info,
        "rows": info["rows"] + sum(g["rows"] for g in groups),
        "groups": info["groups"] + groups,
    }
    _write_info(store, info)
    return {**info, "added_shards": len(new)}
