"""A feature store shipped small: its rows (about 2 KB each) without the derived Grams.

A finished store is mostly derived data: each shard's partial Gram Phi_s^T Phi_s is k x k
float64 (8 MB at k = 1024, whatever the shard's size) and the Fisher is their sum. A bundle
keeps what cannot be recomputed cheaply - store.json, features/, rejects/, done/ - and drops
grams/ and fisher/:

    <bundle>/bundle.json   format, what was left out, the shards, how the store was made
    <bundle>/store.json, features/<shard>.parquet, rejects/<shard>.parquet, done/<shard>.json

`unpack_store` copies a bundle into a store and recomputes each shard's Gram from its
stored (verified) feature values, exactly as `FeatureStore.write_shard` does, rewriting the
shard's marker last with the new Gram's checksum; the Fisher is then fitted by the usual
`pipeline.fisher.update_fisher` (or a `ctrak reindex`). Shards named in `drop` are left
out, so a job can featurize them live into the same store.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ctrak.kernel import gram
from pipeline.config import StorageConfig
from pipeline.errors import StoreCorruptError, StoreNotFoundError
from pipeline.feature_file import table_features
from pipeline.storage import sha256
from pipeline.store import FeatureStore, ShardEntry

BUNDLE_FORMAT = "ctrak-store-bundle/1"
KEPT = ("features", "rejects")  # per-shard files a bundle carries; the Gram is recomputed


def pack_store(store_uri: str, out: str | Path, made_by: str = "", storage=None) -> dict:
    """Write the finished shards of the store at `store_uri` as a bundle folder `out`.
    Returns bundle.json's content. Every file is verified against its marker on the way."""
    store = FeatureStore(store_uri, storage)
    meta = store.metadata()
    entries = store.entries()
    if not entries:
        raise StoreNotFoundError(f"{store_uri} has no finished shard to pack")
    out = Path(out)
    for sub in ("features", "rejects", "done"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "store.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    for shard, entry in entries.items():
        for kind in KEPT:
            (out / entry.files[kind]["path"]).write_bytes(store.read_file(entry, kind))
        (out / "done" / f"{shard}.json").write_bytes(entry.to_json())
    body = {
        "format": BUNDLE_FORMAT,
        "left_out": ["grams/", "fisher/"],
        "shards": {s: e.rows for s, e in sorted(entries.items())},
        "rows": sum(e.rows for e in entries.values()),
        "made_by": made_by,
    }
    (out / "bundle.json").write_text(json.dumps(body, indent=1) + "\n")
    return body


def read_bundle(bundle: str | Path) -> dict:
    """bundle.json; StoreNotFoundError when `bundle` is not a bundle folder."""
    path = Path(bundle) / "bundle.json"
    if not path.is_file():
        raise StoreNotFoundError(f"{bundle} is not a store bundle (no bundle.json)")
    body = json.loads(path.read_text())
    if body.get("format") != BUNDLE_FORMAT:
        raise StoreCorruptError(f"{path}: format {body.get('format')!r}, not {BUNDLE_FORMAT}")
    return body


def unpack_store(
    bundle: str | Path,
    store_uri: str,
    drop: Sequence[str] = (),
    storage: StorageConfig | None = None,
) -> list[str]:
    """Copy a bundle into a new store at `store_uri`, without the shards in `drop`, and
    recompute each copied shard's partial Gram (k, k) float64 from its stored values.
    Returns the copied shard ids. A store already at `store_uri` is refused (nothing is
    overwritten); a bundle file that does not match its marker raises StoreCorruptError."""
    bundle = Path(bundle)
    body = read_bundle(bundle)
    unknown = sorted(set(drop) - set(body["shards"]))
    if unknown:
        raise StoreNotFoundError(f"shards {unknown} are not in the bundle {bundle}")
    source = FeatureStore(str(bundle))
    store = FeatureStore(store_uri, storage)
    if store.exists():
        raise StoreCorruptError(
            f"{store_uri} already holds a store; unpack into a new location (nothing was written)"
        )
    # 1. store.json first: the store exists, with no finished shard yet
    store.write(store.path("store.json"), (bundle / "store.json").read_bytes())
    kept = [s for s in sorted(body["shards"]) if s not in set(drop)]
    for shard in kept:
        marker = source.read_json(source.path("done", f"{shard}.json"))
        entry = ShardEntry(**marker)
        # 2. the shard's files, verified against the bundle's marker
        blobs = {kind: source.read_file(entry, kind) for kind in KEPT}
        stored = table_features(source.read_features(entry))  # (n, k) in the stored dtype
        # 3. its partial Gram from the stored values, as write_shard computes it
        buffer = io.BytesIO()
        np.save(buffer, gram(torch.from_numpy(stored)).numpy())
        blobs["gram"] = buffer.getvalue()
        files = dict(entry.files)
        files["gram"] = {
            "path": f"grams/{shard}.npy",
            "sha256": sha256(blobs["gram"]),
            "bytes": len(blobs["gram"]),
        }
        for kind, data in blobs.items():
            store.write(store.path(files[kind]["path"]), data)
        # 4. the marker last
        fresh = ShardEntry(entry.shard, entry.source, entry.rows, entry.rejects, files)
        store.write(store.path("done", f"{shard}.json"), fresh.to_json())
    return kept
