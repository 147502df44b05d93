"""Integrity of the input beyond one sample: a shard against its source's own count, and
keys that occur in more than one shard.

1. `check_count`: img2dataset writes `{shard}_stats.json` (`successes`) and `{shard}.parquet`
   (one row per URL, `status`) beside each tar. A tar cut exactly at a member boundary reads
   as a shorter valid tar, so only that count tells it is incomplete. When the count is known
   and differs from the samples the tar holds, every row of the shard is rejected with the
   reason (none is featurized from a shard that is not the one its source describes), plus
   one record for the samples that are missing altogether: rows lost 0, rows stored from a
   bad shard 0. Fix the data, delete the shard's done-marker and rerun.
2. `report_duplicates`: the same key in several shards (within a shard it is a reject, see
   pipeline/shards.py) is written to `<store>/reports/duplicate-keys.json` and named in the
   summary, instead of being stored silently under two ids. Run by the driver after a job
   that wrote shards: it reads the `key` column of every finished shard (ranged reads of
   one column; ~20 B a row) and holds a set of the keys: fine to ~10^8 rows, the LAION scale
   (2.3e9) needs the check partitioned by key hash over Ray tasks.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq

from pipeline.store import FeatureStore, ShardEntry

log = logging.getLogger("ctrak.integrity")
REPORT = "reports/duplicate-keys.json"
EXAMPLES = 20  # keys listed in the report (all are counted)


def count_reason(shard: str, count: int, declared: int) -> str:
    return (
        f"shard count mismatch: {shard}.tar holds {count} sample(s) but its img2dataset "
        f"manifest ({shard}_stats.json / {shard}.parquet) declares {declared} (cut at a "
        "member boundary, or another upload); the whole shard is rejected"
    )


def check_count(shard: str, records: list, count: int, declared: int, record_type) -> list:
    """Sorted records of a complete shard -> the same, all rejected with `count_reason` when
    `declared` (>= 0) differs from `count`; a shard short of samples gets one more record
    (row `count`, key "") for the missing ones. `record_type`: pipeline.ingest.Record."""
    if declared < 0 or declared == count:
        return records
    reason = count_reason(shard, count, declared)
    out = [
        r if r.reason else r._replace(reason=reason, feature=np.zeros_like(r.feature))
        for r in records
    ]
    if declared > count:
        k = records[0].feature.shape[0] if records else 1
        missing = f"{declared - count} sample(s) declared by the manifest are missing: {reason}"
        out.append(record_type(count, "", "", "", missing, np.zeros(k, np.float32)))
    log.warning("shard %s: %d sample(s), the manifest declares %d", shard, count, declared)
    return out


def _keys(store: FeatureStore, entry: ShardEntry) -> list[str]:
    """The `key` column of a finished shard's feature file (only that column is read)."""
    path = store.path(entry.files["features"]["path"])
    with store.fs.open(path, "rb") as handle:
        return pq.ParquetFile(handle).read(columns=["key"]).column("key").to_pylist()


def report_duplicates(store: FeatureStore, entries: dict[str, ShardEntry]) -> dict:
    """Find keys stored in more than one shard; write REPORT when it changes (a store that
    never had a duplicate has none; one that had gets a report of 0 keys, so a stale report
    goes away) and return it: {"keys": n, "rows": m, "examples": [...]}."""
    first: dict[str, str] = {}
    shards: dict[str, set[str]] = defaultdict(set)
    for shard in sorted(entries):
        for key in _keys(store, entries[shard]):
            seen = first.setdefault(key, shard)
            if seen != shard:
                shards[key].update((seen, shard))
    examples = [{"key": k, "shards": sorted(shards[k])} for k in sorted(shards)[:EXAMPLES]]
    report = {
        "keys": len(shards),
        "rows": sum(len(s) for s in shards.values()),
        "examples": examples,
    }
    body = (json.dumps(report, indent=1, sort_keys=True) + "\n").encode()
    path = store.path(REPORT)
    old = store.read(path) if store.has(path) else (None if shards else body)
    if old != body:  # written only when it changes: a rerun rewrites nothing
        store.write(path, body)
    if shards:
        log.warning(
            "%d key(s) occur in more than one shard; see %s/%s", len(shards), store.uri, REPORT
        )
    return report
