"""Input shards: list the img2dataset WebDataset tars under a URI, and decode one tar.

Layout (img2dataset, LAION, DataComp, `pipeline/synthetic.py`): `00000.tar` holding
`{key}.jpg|png|webp`, `{key}.txt` (caption) and `{key}.json` (metadata); members of one
sample are consecutive. A shard's id is its file name without `.tar` (e.g. "00000"); it names
every store file of the shard, so it must be a plain name. Tar member names are only ever
compared as strings, never used as filesystem paths.

`decode_shard` is the CPU stage (one Ray task per shard). It streams the tar and yields
record batches:

    shard (B,) str, row (B,) int64, key, caption, metadata (B,) str,
    image (B, S, S, 3) uint8, reason (B,) str, count (B,) int64

- row >= 0, reason "": a decoded sample (S = the model's image size);
- row >= 0, reason "...": a rejected sample (undecodable, no caption, wrong size or mode,
  duplicate key, bad metadata) with a zero image - recorded, never silently fixed;
- row == -1: the shard's end record, `count` = the number of sample records it emitted;
  a non-empty reason there means the tar itself was unreadable (the shard stays pending).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import StorageConfig
from pipeline.errors import NoShardsError, StorageError
from pipeline.storage import filesystem, list_files

SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
RECORD_COLUMNS = ("shard", "row", "key", "caption", "metadata", "image", "reason", "count")


@dataclass(frozen=True)
class ShardRef:
    """One input tar: `id` ("00000"), `uri` (s3://bucket/data/00000.tar or a local path)."""

    id: str
    uri: str
    size: int


def list_shards(data_uri: str, storage: StorageConfig | None = None) -> list[ShardRef]:
    """The `.tar` shards directly under `data_uri` (or the one `.tar` it names), by id."""
    fs, root = filesystem(data_uri, storage)
    prefix = data_uri.split("://", 1)[0] + "://" if "://" in data_uri else ""
    if root.endswith(".tar"):
        files = {root: int(fs.size(root))} if fs.exists(root) else {}
    else:
        files = list_files(fs, root, ".tar")
    if not files:
        raise NoShardsError(
            f"no .tar shards under {data_uri}: give the folder of an img2dataset WebDataset "
            "(00000.tar, 00001.tar, ...) or generate one with `ctrak generate`"
        )
    shards = []
    for path, size in sorted(files.items()):
        name = path.rsplit("/", 1)[-1].removesuffix(".tar")
        if not SHARD_ID.match(name):
            raise StorageError(
                f"shard file name {name!r}.tar under {data_uri} is not a plain name "
                "([A-Za-z0-9._-], at most 128 characters); rename it"
            )
        uri = prefix + path if prefix and not path.startswith(prefix) else path
        shards.append(ShardRef(id=name, uri=uri, size=size))
    return shards


# ---- one sample ------------------------------------------------------------------------------
def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (S, S, 3) uint8. ValueError naming the problem when the image is
    undecodable, not RGB, or not S x S (never resized or converted here)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.size != (image_size, image_size):
            width, height = image.size
            raise ValueError(
                f"image is {width}x{height}, the model takes {image_size}x{image_size}"
            )
        if image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode}, expected RGB")
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"undecodable image: {err}") from None
    return array


def decode_sample(parts: dict[str, bytes], image_size: int) -> tuple[np.ndarray, str, str]:
    """{extension: bytes} of one sample -> (image (S, S, 3) uint8, caption, metadata JSON text).
    Raises ValueError with the reject reason."""
    images = [ext for ext in IMAGE_EXTENSIONS if ext in parts]
    if not images:
        raise ValueError(f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
    if len(images) > 1:
        raise ValueError(f"several image members ({', '.join(images)})")
    if "txt" not in parts:
        raise ValueError("missing caption (.txt member)")
    try:
        caption = parts["txt"].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("caption is not UTF-8") from None
    metadata = ""
    if "json" in parts:
        try:
            metadata = parts["json"].decode("utf-8")
            if not isinstance(json.loads(metadata), dict):
                raise ValueError
        except ValueError:
            raise ValueError("metadata (.json member) is not a JSON object") from None
    return decode_image(parts[images[0]], image_size), caption, metadata


def iter_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """Stream (key, {extension: bytes}, problem) per sample, in tar order. Members of a sample
    are consecutive; a key seen before, a repeated member or a non-file member is a problem."""
    seen: set[str] = set()
    key, parts, problem = None, {}, ""
    for member in tar:
        if member.isdir():
            continue
        base = member.name.rsplit("/", 1)[-1]
        stem, _, ext = base.partition(".")
        name = member.name[: len(member.name) - len(base)] + stem
        if name != key:
            if key is not None:
                yield key, parts, problem
            key, parts = name, {}
            problem = "duplicate key" if name in seen else ""
            seen.add(name)
        ext = ext.lower()
        if not member.isfile():
            problem = problem or f"member {member.name!r} is not a regular file"
        elif not ext:
            problem = problem or f"member {member.name!r} has no extension"
        elif ext in parts:
            problem = problem or f"member {member.name!r} appears twice"
        else:
            parts[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, parts, problem


# ---- the CPU stage -----------------------------------------------------------------------------
def _batch(records: list[dict], image_size: int) -> dict[str, np.ndarray]:
    blank = np.zeros((image_size, image_size, 3), np.uint8)
    out = {
        name: np.array([r[name] for r in records], dtype=object)
        for name in ("shard", "key", "caption", "metadata", "reason")
    }
    out["row"] = np.array([r["row"] for r in records], dtype=np.int64)
    out["count"] = np.array([r.get("count", 0) for r in records], dtype=np.int64)
    out["image"] = np.stack([blank if r.get("image") is None else r["image"] for r in records])
    return out


def shard_records(handle, shard: str, image_size: int) -> Iterator[dict]:
    """Stream one open tar -> a record per sample (decoded or rejected), then the end record."""
    count, failure = 0, ""
    try:
        with tarfile.open(fileobj=handle, mode="r|") as tar:
            for row, (key, parts, problem) in enumerate(iter_samples(tar)):
                record = {
                    "shard": shard,
                    "row": row,
                    "key": key,
                    "caption": "",
                    "metadata": "",
                    "reason": problem,
                }
                if not problem:
                    try:
                        image, caption, metadata = decode_sample(parts, image_size)
                        record.update(image=image, caption=caption, metadata=metadata)
                    except ValueError as err:
                        record["reason"] = str(err)
                yield record
                count += 1
    except tarfile.TarError as err:
        failure = f"unreadable tar: {err}"
    yield {
        "shard": shard,
        "row": -1,
        "key": "",
        "caption": "",
        "metadata": "",
        "reason": failure,
        "count": count,
    }


def decode_shard(
    batch: dict[str, np.ndarray],
    *,
    storage: StorageConfig,
    image_size: int,
    rows_per_batch: int = 64,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches fn: input rows {shard (id), uri} -> record batches (module doc).

    I/O errors propagate (s3fs already retries transient ones) and fail the job, whose
    finished shards are kept; a tar that does not parse ends the shard with an "unreadable"
    end record, so the other shards go on."""
    for shard, uri in zip(batch["shard"], batch["uri"], strict=True):
        fs, path = filesystem(str(uri), storage)
        with fs.open(path, "rb") as handle:
            chunk: list[dict] = []
            for record in shard_records(handle, str(shard), image_size):
                chunk.append(record)
                if len(chunk) == rows_per_batch:
                    yield _batch(chunk, image_size)
                    chunk = []
            if chunk:
                yield _batch(chunk, image_size)
