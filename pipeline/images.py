"""Training images of query hits, read back from the input tar shards they were featurized from.

The store keeps features, not pixels; each shard's done-marker records the `source` URI of
its tar (`<store>/done/<shard>.json`). For a report, the few hit images are fetched from
there: the wanted (shard, key) pairs are grouped by shard and each needed tar is streamed
once (local path or s3:// through `pipeline.storage.filesystem`), stopping as soon as its
wanted keys are found. Keys are matched exactly as `pipeline.shards.iter_samples` names them,
which is how the store names its rows. `hit_images` does this for query results.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import StorageConfig
from pipeline.errors import StorageError
from pipeline.shards import IMAGE_EXTENSIONS, iter_samples, list_shards
from pipeline.storage import filesystem
from pipeline.store import FeatureStore

if TYPE_CHECKING:
    from pipeline.query import QueryResult

log = logging.getLogger("ctrak.images")
MAX_PARALLEL_SHARDS = 8  # tars read at once (threads: the work is I/O and PNG decoding)


def store_sources(store: FeatureStore, shards: Iterable[str]) -> dict[str, str]:
    """{shard id: tar URI} as the finished shards' done-markers record it."""
    entries = store.entries(sorted(set(shards)))
    return {shard: entry.source for shard, entry in entries.items()}


def data_sources(data_uri: str, storage: StorageConfig | None = None) -> dict[str, str]:
    """{shard id: tar URI} of the `.tar` shards under a data URI (when the tars have moved
    since featurizing, e.g. to another bucket, with the same file names)."""
    return {shard.id: shard.uri for shard in list_shards(data_uri, storage)}


def _decode(data: bytes) -> np.ndarray:
    """Image bytes -> (H, W, 3) uint8, converted to RGB whatever the mode (display only)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _read_shard(uri: str, keys: set[str], storage: StorageConfig | None) -> dict[str, np.ndarray]:
    """Stream one tar and decode the images of `keys` -> {key: (H, W, 3) uint8}."""
    fs, path = filesystem(uri, storage)
    found: dict[str, np.ndarray] = {}
    try:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            for key, parts, problem in iter_samples(tar):
                image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
                if key in keys and image is not None and not problem:
                    try:
                        found[key] = _decode(image)
                    except OSError:
                        continue  # undecodable: the store rejected it too; reported missing
                    if len(found) == len(keys):
                        break
    except FileNotFoundError:
        raise StorageError(
            f"shard tar {uri} does not exist (moved or deleted since featurizing); pass the "
            "data folder it now lives in"
        ) from None
    except PermissionError as err:
        raise StorageError(f"reading {uri} was refused ({err}); check the credentials") from None
    except tarfile.TarError as err:
        raise StorageError(f"shard tar {uri} is unreadable: {err}") from None
    return found


def fetch_images(
    sources: Mapping[str, str],
    wanted: Iterable[tuple[str, str]],
    storage: StorageConfig | None = None,
) -> dict[tuple[str, str], np.ndarray]:
    """(shard, key) pairs -> {(shard, key): image (H, W, 3) uint8}, reading each needed tar
    once. `sources` maps shard id -> tar URI (`store_sources` or `data_sources`).

    A key that its tar does not hold (or whose image does not decode) is absent from the
    result; a shard without a source, or a tar that is missing or unreadable, raises
    StorageError naming it.
    """
    by_shard: dict[str, set[str]] = defaultdict(set)
    for shard, key in wanted:
        by_shard[shard].add(key)
    unknown = sorted(s for s in by_shard if s not in sources)
    if unknown:
        raise StorageError(
            f"no source tar known for shard(s) {unknown}; give the data folder that holds "
            f"{unknown[0]}.tar"
        )
    shards = sorted(by_shard)
    with ThreadPoolExecutor(max_workers=max(1, min(MAX_PARALLEL_SHARDS, len(shards)))) as pool:
        parts = pool.map(lambda s: _read_shard(sources[s], by_shard[s], storage), shards)
        return {
            (shard, key): image
            for shard, found in zip(shards, parts, strict=True)
            for key, image in found.items()
        }


def hit_images(
    store_uri: str,
    results: Sequence[QueryResult],
    storage: StorageConfig | None = None,
    data_uri: str = "",
) -> dict[tuple[str, str], np.ndarray]:
    """{(shard, key): (H, W, 3) uint8} of every hit of `results`, read from the tars the
    store's markers name (or, when those are gone, the same-named tars under `data_uri`).
    For a report: logs a warning and returns what it could read when a source fails."""
    wanted = {(h.shard, h.key) for r in results for h in r.hits}
    store = FeatureStore(store_uri, storage)
    try:
        images = fetch_images(store_sources(store, {s for s, _ in wanted}), wanted, storage)
    except StorageError as err:
        if not data_uri:
            log.warning("report without training images: %s", err)
            return {}
        try:
            images = fetch_images(data_sources(data_uri, storage), wanted, storage)
        except StorageError as again:
            log.warning("report without training images: %s", again)
            return {}
    if len(images) < len(wanted):
        log.warning("%d hit image(s) not found in their shards", len(wanted) - len(images))
    return images
