"""Environment checks of a writer (featurize/reindex): a writable store, and a full disk
explained with the space the job still needs.

- `check_writable(store)`: a probe object written and deleted before any work (model load,
  featurization): a read-only file system, a forbidden prefix or missing permission is a
  StoreNotWritableError naming the path - not a raw `OSError [Errno 30]` after the first
  shard was featurized;
- `explain_write_error(err, ...)`: a StoreWriteError of a shard write (pipeline/storage.py)
  with what the rest of the job needs: the remaining shards times the bytes of a shard
  (measured on the shards written so far, else on the one that failed) plus the Fisher
  (K and L, 2 k^2 float64), against the free space of the disk. Finished shards are kept and
  a rerun resumes.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid

from pipeline.errors import StorageError, StoreNotWritableError, StoreWriteError
from pipeline.storage import redact
from pipeline.store import FeatureStore, ShardEntry

FULL = (errno.ENOSPC, errno.EDQUOT)


def check_writable(store: FeatureStore) -> None:
    """Write and delete `<store>/.write-probe-<uuid>`; StoreNotWritableError when refused."""
    probe = store.path(f".write-probe-{uuid.uuid4().hex}")
    try:
        store.write(probe, b"ctrak write probe\n")
        store.fs.rm_file(probe)
    except (StorageError, OSError) as err:
        reason = err.args[0] if isinstance(err, StorageError) else redact(err)
        raise StoreNotWritableError(
            f"the store {store.uri} is not writable ({reason}); featurize and reindex write "
            "shards, the Fisher and a lease there. Mount it read-write, fix its permissions "
            "or credentials, or give another job.store. Queries only read it"
        ) from None


def shard_bytes(entry: ShardEntry) -> int:
    """Bytes of one finished shard: its files plus the marker (~1 KB)."""
    return sum(int(f["bytes"]) for f in entry.files.values()) + 1024


def _free_bytes(path: str) -> int | None:
    folder = path
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder or "/").free
    except OSError:
        return None


def explain_write_error(
    err: StoreWriteError, *, remaining: int, per_shard: int, k: int
) -> StoreWriteError:
    """`err` with the job's needs when the disk is full; as it is otherwise.
    `remaining`: shards not yet written (the failed one included); `per_shard`: bytes."""
    if err.errno not in FULL:
        return err
    fisher = 2 * k * k * 8 + 4096  # K and L float64 + the markers
    need = remaining * per_shard + fisher
    free = _free_bytes(err.path)
    have = "" if free is None else f"; the disk has {free / 1e6:.2f} MB free"
    return StoreWriteError(
        f"{err.args[0]}: the disk holding the store is full. The job still needs about "
        f"{need / 1e6:.2f} MB ({remaining} shard(s) of ~{per_shard / 1e3:.1f} KB each, plus "
        f"{fisher / 1e3:.1f} KB for the Fisher){have}. Free space (or move job.store) and "
        "rerun the same command: finished shards are kept, the rest resume",
        path=err.path,
        errno=err.errno,
        size=err.size,
    )
