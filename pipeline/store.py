"""The feature store: the one home of its paths, writes, reads and provenance check.

    <store>/store.json               provenance (model hash, method, timesteps, inversion,
                                     projection seed/k/kind, code version) + feature dtype
    <store>/features/<shard>.parquet key, shard, row, caption, metadata (snappy; shard,
                                     caption, metadata dictionary-encoded),
                                     feature fixed_size_binary(k * itemsize): row-major
                                     float16|float32 (field metadata `dtype`), PLAIN, no
                                     compression, no dictionary: decodes at memory-copy speed;
                                     feature_norm float32 ||phi_i||_2 of the stored values
                                     (the float32 screen's error bound, `pipeline.scan.screen`)
    <store>/grams/<shard>.npy        Phi_s^T Phi_s (k, k) float64 of the STORED values
    <store>/rejects/<shard>.parquet  shard, row, key, reason
    <store>/done/<shard>.json        the shard's marker, written LAST: row counts and the
                                     sha256 + size of each file above
    <store>/fisher/...               the merged Fisher (home: pipeline/fisher.py)

A shard counts as finished only when its marker exists, and a marker is written after the
files it describes (each an atomic write: temp + rename locally, one PUT on S3). A crash
leaves at most files without a marker, which no reader opens and a rerun overwrites under
the same deterministic names. Partial Grams add up: K = sum_s Phi_s^T Phi_s.

Every read of a shard file is checked against the size and sha256 its marker recorded, and
a marker or store.json that does not parse is refused: StoreCorruptError names the file and
the fix (delete the shard's marker, rerun `ctrak reindex`). Object-storage calls retry
transient errors (`pipeline.storage.Retry`).

Stores written before the fixed_size_binary layout hold `feature` as
fixed_size_list<float16|float32>[k] (dictionary-encoded, snappy) without `feature_norm`; they
read unchanged (`feature_view` takes both layouts), only slower to scan.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ctrak.config import OTHER_PROVENANCE, PROVENANCE
from ctrak.kernel import gram
from pipeline.config import StorageConfig
from pipeline.errors import (
    MissingFileError,
    ProvenanceMismatchError,
    StoreCorruptError,
    StoreNotFoundError,
)
from pipeline.feature_file import PAD_COLUMN, feature_table, parquet_batches, parquet_bytes
from pipeline.shards import ShardRef
from pipeline.storage import (
    exists,
    filesystem,
    join,
    list_files,
    read_bytes,
    retry_policy,
    sha256,
    write_atomic,
)

FORMAT = "ctrak-feature-store/1"
KINDS = {"features", "gram", "rejects"}  # the files of a finished shard
MARKER_FIELDS = {"shard", "source", "rows", "rejects", "files"}
# provenance key -> the setting that fixes it (named in a mismatch): one table, ctrak.config's
SETTING = {key: setting for key, (setting, _) in PROVENANCE.items()} | OTHER_PROVENANCE


def _plain(value: object) -> object:
    return json.loads(json.dumps(value))  # tuples -> lists, as stored


def check_provenance(stored: dict, actual: dict, where: str = "this job") -> None:
    """Raise ProvenanceMismatchError naming every field that differs and how to fix it."""
    stored, actual = _plain(stored), _plain(actual)
    keys = sorted(set(stored) | set(actual))
    diffs = [k for k in keys if stored.get(k) != actual.get(k)]
    if diffs:
        lines = "; ".join(
            f"{k}: store {stored.get(k)!r} vs {where} {actual.get(k)!r} (set by "
            f"{SETTING.get(k, k)})"
            for k in diffs
        )
        raise ProvenanceMismatchError(
            f"the store was made with other settings - {lines}. Fix: use the store's settings, "
            "or write to a new store (job.store=NEW_URI)"
        )


def check_settings(stored: dict, settings: dict, where: str = "this job") -> None:
    """check_provenance on the fields `settings` has (e.g. AttributionConfig.provenance():
    method, timesteps, projection, ...): refuses a store before any model is loaded."""
    check_provenance({k: stored.get(k) for k in settings}, settings, where)


@dataclass(frozen=True)
class ShardEntry:
    """A finished shard, as its marker records it."""

    shard: str
    source: str
    rows: int
    rejects: int
    files: dict  # kind -> {"path": relative path, "sha256": hex, "bytes": int}

    def to_json(self) -> bytes:
        body = {
            "shard": self.shard,
            "source": self.source,
            "rows": self.rows,
            "rejects": self.rejects,
            "files": self.files,
        }
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


def _parse_json(data: bytes, path: str, uri: str) -> dict:
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("not an object")
    except ValueError as err:
        raise StoreCorruptError(
            f"{path} of the store {uri} is not valid JSON ({err}): the file was truncated or "
            "altered. A done-marker: delete it and run `ctrak reindex`; store.json: restore it "
            "or write to a new store"
        ) from None
    return body


class FeatureStore:
    """One store at `uri` (a folder or s3://bucket/prefix)."""

    def __init__(self, uri: str, storage: StorageConfig | None = None) -> None:
        self.uri = uri
        self.storage = storage or StorageConfig()
        self.fs, self.root = filesystem(uri, self.storage)
        self.retry = retry_policy(uri, self.storage)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    # ---- plain I/O with this store's retries ---------------------------------------------
    def read(self, path: str) -> bytes:
        return read_bytes(self.fs, path, self.retry)

    def write(self, path: str, data: bytes) -> None:
        write_atomic(self.fs, path, data, self.retry)

    def has(self, path: str) -> bool:
        return exists(self.fs, path, self.retry)

    def read_json(self, path: str) -> dict:
        """A JSON file of the store (store.json, a marker); StoreCorruptError if it does not
        parse as an object."""
        return _parse_json(self.read(path), path, self.uri)

    # ---- store.json -----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.has(self.path("store.json"))

    def metadata(self) -> dict:
        """store.json; StoreNotFoundError when the store was never created."""
        if not self.exists():
            raise StoreNotFoundError(
                f"no feature store at {self.uri} (store.json missing): run `ctrak featurize` "
                "with job.store set to it first"
            )
        return self.read_json(self.path("store.json"))

    def open(
        self, provenance: dict, feature_dtype: str, create: bool, decode: dict | None = None
    ) -> dict:
        """Create store.json (create=True and absent) or check it against this job's
        provenance, feature dtype and image decoding (`decode`, pipeline.shards.DECODE);
        returns the store metadata."""
        wanted = {
            "format": FORMAT,
            "provenance": _plain(provenance),
            "feature_dtype": feature_dtype,
            "k": int(provenance["projection_k"]),
            **({"decode": decode} if decode is not None else {}),
        }
        if create and not self.exists():
            body = json.dumps(wanted, indent=1, sort_keys=True) + "\n"
            self.write(self.path("store.json"), body.encode())
            return wanted
        meta = self.metadata()
        check_provenance(
            {**meta["provenance"], "feature_dtype": meta["feature_dtype"]},
            {**wanted["provenance"], "feature_dtype": feature_dtype},
        )
        if decode is not None and meta.get("decode") != _plain(decode):
            raise ProvenanceMismatchError(
                f"the store {self.uri} was decoded with {meta.get('decode')!r} (none recorded: "
                f"before EXIF orientation was applied), this job decodes with {decode!r}: a "
                "rotated JPEG would get other features than its shard-mates. Write to a new "
                "store (job.store=NEW_URI)"
            )
        return meta

    # ---- finished shards -----------------------------------------------------------------
    def done_ids(self) -> list[str]:
        """Ids of the finished shards (those with a marker), sorted."""
        markers = list_files(self.fs, self.path("done"), ".json", self.retry)
        return sorted(p.rsplit("/", 1)[-1].removesuffix(".json") for p in markers)

    def entries(self, ids: list[str] | None = None) -> dict[str, ShardEntry]:
        """{id: ShardEntry} of finished shards (all, or `ids`), markers fetched together."""
        ids = self.done_ids() if ids is None else ids
        paths = [self.path("done", f"{i}.json") for i in ids]
        if not paths:
            return {}
        blobs = self.retry.call(f"reading {len(paths)} marker(s) of {self.uri}", self.fs.cat, paths)
        out = {}
        for i, p in zip(ids, paths, strict=True):
            body = _parse_json(blobs[p], p, self.uri) if p in blobs else self.read_json(p)
            files = body.get("files")
            if set(body) != MARKER_FIELDS or not isinstance(files, dict) or set(files) != KINDS:
                raise StoreCorruptError(
                    f"{p} is not a done-marker of this store format; delete it and run "
                    "`ctrak reindex` to recompute the shard"
                )
            out[i] = ShardEntry(**body)
        return out

    def write_shard(
        self,
        shard: ShardRef,
        columns: dict,
        features: np.ndarray,
        rejects: list[dict],
        feature_dtype: str,
    ) -> ShardEntry:
        """Write one shard: features (n, k) float32 cast to the stored dtype, its partial
        Gram (k, k) from the stored values, its rejects, then the marker last."""
        stored = features.astype(feature_dtype)  # (n, k)
        partial = gram(torch.from_numpy(stored)).numpy()  # (k, k) float64, of stored values
        gram_buffer = io.BytesIO()
        np.save(gram_buffer, partial)
        reject_table = pa.table(
            {
                "shard": pa.array([shard.id] * len(rejects), pa.string()),
                "row": pa.array([r["row"] for r in rejects], pa.int64()),
                "key": pa.array([r["key"] for r in rejects], pa.string()),
                "reason": pa.array([r["reason"] for r in rejects], pa.string()),
            }
        )
        blobs = {
            "features": (
                f"features/{shard.id}.parquet",
                parquet_bytes(feature_table(shard.id, columns, stored)),
            ),
            "gram": (f"grams/{shard.id}.npy", gram_buffer.getvalue()),
            "rejects": (f"rejects/{shard.id}.parquet", parquet_bytes(reject_table)),
        }
        files = {}
        for kind, (relative, data) in blobs.items():
            self.write(self.path(relative), data)
            files[kind] = {"path": relative, "sha256": sha256(data), "bytes": len(data)}
        entry = ShardEntry(shard.id, shard.uri, int(stored.shape[0]), len(rejects), files)
        self.write(self.path("done", f"{shard.id}.json"), entry.to_json())
        return entry

    # ---- reading -------------------------------------------------------------------------
    def read_file(self, entry: ShardEntry, kind: str) -> bytes:
        """A shard file, verified against the size and sha256 in its marker."""
        info = entry.files[kind]
        fix = (
            f"delete {self.uri}/done/{entry.shard}.json and run `ctrak reindex` with this store "
            "to recompute the shard"
        )
        try:
            data = self.read(self.path(info["path"]))
        except MissingFileError:
            raise StoreCorruptError(
                f"shard {entry.shard}: {self.uri}/{info['path']} is missing although "
                f"done/{entry.shard}.json marks the shard finished; {fix}"
            ) from None
        if len(data) != info["bytes"] or sha256(data) != info["sha256"]:
            raise StoreCorruptError(
                f"shard {entry.shard}: {self.uri}/{info['path']} does not match the checksum in "
                f"done/{entry.shard}.json ({len(data)} bytes, marker says {info['bytes']}: "
                f"truncated or altered); {fix}"
            )
        return data

    def load_gram(self, entry: ShardEntry) -> np.ndarray:
        """Phi_s^T Phi_s (k, k) float64 of one finished shard."""
        return np.load(io.BytesIO(self.read_file(entry, "gram")))

    def read_features(self, entry: ShardEntry) -> pa.Table:
        """The shard's feature table (verified), without the layout's PAD_COLUMN."""
        table = pq.read_table(pa.BufferReader(self.read_file(entry, "features")))
        return table.drop_columns([PAD_COLUMN]) if PAD_COLUMN in table.column_names else table

    def feature_batches(self, entry: ShardEntry, rows: int) -> Iterator[pa.RecordBatch]:
        """The shard's feature table (verified) as record batches (`parquet_batches`)."""
        return parquet_batches(self.read_file(entry, "features"), rows)

    def read_rejects(self, entry: ShardEntry) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_file(entry, "rejects")))
