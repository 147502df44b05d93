"""Input shards: list the img2dataset WebDataset tars under a URI, and decode one tar.

Layout (img2dataset, LAION, DataComp, `ctrak/toy/worlds.py`): `00000.tar` holding
`{key}.jpg|png|webp`, `{key}.txt` (caption) and `{key}.json` (metadata); members of one
sample are consecutive. A shard's id is its file name without `.tar` (e.g. "00000"); it names
every store file of the shard, so it must be a plain name. Tar member names are only ever
compared as strings, never used as filesystem paths: nothing is extracted to disk.

`decode_shard` is the CPU stage (one Ray task per shard). It streams the tar and yields
record batches:

    shard (B,) str, row (B,) int64, key, caption, metadata (B,) str,
    image (B, S, S, 3) uint8, reason (B,) str, count (B,) int64

- row >= 0, reason "": a decoded sample (S = the model's image size);
- row >= 0, reason "...": a rejected sample (undecodable, no caption, wrong size or mode,
  duplicate key, bad metadata) with a zero image - recorded, never silently fixed. A tar that
  breaks off (truncated) or does not parse at all ends with one rejected record: the sample
  it broke off in, or key "" for the shard itself ("unreadable tar: ...");
- row == -1: the shard's end record, `count` = the number of sample records it emitted,
  `declared` = the count img2dataset's manifest beside the tar declares ({id}_stats.json
  `successes`, else {id}.parquet's "success" rows; -1 without one). The driver rejects every
  row of a shard whose count differs (`pipeline.integrity`): a tar cut exactly at a member
  boundary reads as a shorter valid tar, and only the source's own count tells.

Reading retries transient object-storage errors (`pipeline.storage.Retry`): after a dropped
connection the tar is reopened and the records already emitted are skipped, so each row is
emitted once; past storage.retry_limit_s the task fails with StorageUnavailableError.
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
from pipeline.errors import MissingFileError, NoShardsError, StorageError
from pipeline.storage import exists, filesystem, list_files, read_bytes, redact, retry_policy

SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# how images become pixels, recorded in the store's store.json (a store decoded otherwise is
# refused by reindex: its features would mean something else for rotated JPEGs)
DECODE = {"exif_orientation": "applied"}
MAX_CAPTION_BYTES = 16384  # job.max_caption_bytes' default
RECORD_COLUMNS = (
    *("shard", "row", "key", "caption", "metadata", "image", "reason", "count", "declared"),
)


@dataclass(frozen=True)
class ShardRef:
    """One input tar: `id` ("00000"), `uri` (s3://bucket/data/00000.tar or a local path)."""

    id: str
    uri: str
    size: int
    manifest: str = ""  # img2dataset's {id}_stats.json (else {id}.parquet) beside it, if any


def list_shards(data_uri: str, storage: StorageConfig | None = None) -> list[ShardRef]:
    """The `.tar` shards directly under `data_uri` (or the one `.tar` it names), by id."""
    fs, root = filesystem(data_uri, storage)
    retry = retry_policy(data_uri, storage)
    prefix = data_uri.split("://", 1)[0] + "://" if "://" in data_uri else ""
    if root.endswith(".tar"):
        found = exists(fs, root, retry)
        files = {root: int(retry.call(f"sizing {data_uri}", fs.size, root))} if found else {}
        stem = root.removesuffix(".tar")
        listed = {p: 0 for p in MANIFESTS(stem) if exists(fs, p, retry)} if found else {}
    else:
        listed = list_files(fs, root, "", retry)  # one listing: tars and their manifests
        files = {p: n for p, n in listed.items() if p.endswith(".tar")}
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
        manifest = next((m for m in MANIFESTS(path.removesuffix(".tar")) if m in listed), "")
        if manifest and prefix and not manifest.startswith(prefix):
            manifest = prefix + manifest
        shards.append(ShardRef(id=name, uri=uri, size=size, manifest=manifest))
    return shards


def MANIFESTS(stem: str) -> tuple[str, str]:  # noqa: N802 - a constant's spelling
    """Where img2dataset declares a shard's sample count, in order of preference."""
    return f"{stem}_stats.json", f"{stem}.parquet"


def declared_count(manifest: str, storage: StorageConfig | None = None) -> int:
    """The number of samples a shard's manifest declares (-1: no manifest, or one without a
    count): `successes` of {id}_stats.json, else the rows of {id}.parquet whose `status` is
    "success" (all rows without a status column)."""
    if not manifest:
        return -1
    fs, path = filesystem(manifest, storage)
    retry = retry_policy(manifest, storage)
    data = read_bytes(fs, path, retry)
    try:
        if path.endswith(".json"):
            value = json.loads(data).get("successes", -1)
            return int(value) if isinstance(value, int) else -1
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data), columns=None)
        if "status" not in table.column_names:
            return table.num_rows
        return sum(1 for v in table.column("status").to_pylist() if v == "success")
    except (ValueError, AttributeError, OSError):  # not JSON / not Parquet: no usable count
        return -1


# ---- one sample ------------------------------------------------------------------------------
def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> (S, S, 3) uint8, rotated/flipped by its EXIF orientation tag.
    ValueError naming the problem when the image is undecodable, not RGB, or not S x S (never
    resized or converted here)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        # 1. as every viewer shows it: the EXIF orientation (a phone JPEG) applied (DECODE)
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        if image.size != (image_size, image_size):
            width, height = image.size
            raise ValueError(
                f"image is {width}x{height}, the model takes {image_size}x{image_size}"
            )
        if image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode}, expected RGB")
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("undecodable image: not a format Pillow identifies") from None
    except (OSError, Image.DecompressionBombError) as err:  # truncated, corrupt, bomb
        raise ValueError(f"undecodable image: {err}") from None
    return array


def decode_sample(
    parts: dict[str, bytes], image_size: int, max_caption_bytes: int = MAX_CAPTION_BYTES
) -> tuple[np.ndarray, str, str]:
    """{extension: bytes} of one sample -> (image (S, S, 3) uint8, caption, metadata JSON text).
    Raises ValueError with the reject reason (a caption over `max_caption_bytes` too: it is
    never cut)."""
    images = [ext for ext in IMAGE_EXTENSIONS if ext in parts]
    if not images:
        raise ValueError(f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
    if len(images) > 1:
        raise ValueError(f"several image members ({', '.join(images)})")
    if "txt" not in parts:
        raise ValueError("missing caption (.txt member)")
    if len(parts["txt"]) > max_caption_bytes:
        raise ValueError(
            f"caption is {len(parts['txt'])} bytes > job.max_caption_bytes={max_caption_bytes}"
        )
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


def iter_samples(
    tar: tarfile.TarFile, salvage: bool = False
) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """Stream (key, {extension: bytes}, problem) per sample, in tar order. Members of a sample
    are consecutive; a key seen before, a repeated member or a non-file member is a problem.

    A tar that breaks off raises tarfile.TarError, unless `salvage`: then the sample it broke
    off in (or, before any member, key "") comes last, with the problem "truncated tar ..."."""
    seen: set[str] = set()
    key, parts, problem = None, {}, ""
    try:
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
    except tarfile.TarError as err:
        if not salvage:
            raise
        where = "in or after this sample" if key is not None else "before its first sample"
        yield key or "", parts, f"truncated tar: {err} ({where}; the rest of the tar is lost)"
        return
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
    out["declared"] = np.array([r.get("declared", -1) for r in records], dtype=np.int64)
    out["image"] = np.stack([blank if r.get("image") is None else r["image"] for r in records])
    return out


def _salvaged_samples(handle) -> Iterator[tuple[str, dict[str, bytes], str]]:
    """iter_samples(salvage=True) of an open tar file; a tar whose first header does not
    parse is one problem sample with key ""."""
    try:
        tar = tarfile.open(fileobj=handle, mode="r|")  # noqa: SIM115 - closed below
    except tarfile.TarError as err:
        yield "", {}, f"unreadable tar: {err}"
        return
    with tar:
        yield from iter_samples(tar, salvage=True)


def shard_records(
    handle, shard: str, image_size: int, max_caption_bytes: int = MAX_CAPTION_BYTES
) -> Iterator[dict]:
    """Stream one open tar -> a record per sample (decoded or rejected), then the end record.
    I/O errors of `handle` propagate; a tar that does not parse ends in a rejected record."""
    count = 0
    for row, (key, parts, problem) in enumerate(_salvaged_samples(handle)):
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
                image, caption, metadata = decode_sample(parts, image_size, max_caption_bytes)
                record.update(image=image, caption=caption, metadata=metadata)
            except ValueError as err:
                record["reason"] = str(err)
        yield record
        count += 1
    yield {
        "shard": shard,
        "row": -1,
        "key": "",
        "caption": "",
        "metadata": "",
        "reason": "",
        "count": count,
    }


def decode_shard(
    batch: dict[str, np.ndarray],
    *,
    storage: StorageConfig,
    image_size: int,
    rows_per_batch: int = 64,
    max_caption_bytes: int = MAX_CAPTION_BYTES,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data map_batches fn: input rows {shard (id), uri} -> record batches (module doc).

    A transient read error reopens the tar and skips the records already emitted (retried
    for storage.retry_limit_s of no progress); a missing or forbidden tar is a StorageError
    that fails the job, whose finished shards are kept."""
    manifests = batch.get("manifest", [""] * len(batch["shard"]))
    for shard, uri, manifest in zip(batch["shard"], batch["uri"], manifests, strict=True):
        shard, uri = str(shard), str(uri)
        declared = declared_count(str(manifest), storage)  # -1: the source declares none
        backoff = retry_policy(uri, storage).backoff()
        chunk: list[dict] = []
        emitted = 0  # sample records emitted (or queued in chunk) so far
        while True:
            try:
                fs, path = filesystem(uri, storage)
                with fs.open(path, "rb") as handle:
                    for record in shard_records(handle, shard, image_size, max_caption_bytes):
                        if 0 <= record["row"] < emitted:
                            continue  # emitted before the connection dropped
                        if record["row"] < 0:
                            record["declared"] = declared
                        chunk.append(record)
                        emitted += record["row"] >= 0
                        backoff.reset()  # progress: a later failure is a new outage
                        if len(chunk) == rows_per_batch:
                            yield _batch(chunk, image_size)
                            chunk = []
                break
            except FileNotFoundError:
                raise MissingFileError(
                    f"shard {shard}: {uri} disappeared after it was listed; rerun to list the "
                    "data again"
                ) from None
            except PermissionError as err:
                raise StorageError(
                    f"shard {shard}: reading {uri} was refused ({redact(err)}); check the "
                    "credentials"
                ) from None
            except Exception as err:
                backoff.wait(err, f"reading shard {uri}")
        if chunk:
            yield _batch(chunk, image_size)
