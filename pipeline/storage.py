"""Local paths and s3:// URIs behind one fsspec interface, with atomic writes.

- `filesystem(uri, storage)` -> (fs, path): s3fs for s3://, the local disk for plain paths;
- `write_atomic(fs, path, data)`: on a local disk a temporary sibling then `os.replace` (a
  reader sees the old file or the new one, never half of one); on object storage one PUT (an
  object appears whole or not at all). Multi-file artifacts add a marker written LAST;
- `list_files(fs, folder, suffix)`: a fresh listing (fsspec caches listings per instance,
  which would hide files another process wrote since).

Errors carry the URI and the fix, never the credentials.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.config import StorageConfig
from pipeline.errors import StorageError

S3_SCHEMES = ("s3", "s3a")


def scheme(uri: str) -> str:
    """ "s3" for s3://bucket/key, "file" for a plain path, else the URI's protocol."""
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def filesystem(
    uri: str, storage: StorageConfig | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """URI -> (fsspec filesystem, path inside it). s3:// uses `storage` (resolved on the
    driver); local paths are made absolute so Ray workers on this machine agree."""
    if not uri:
        raise StorageError("empty URI: give a folder or an s3://bucket/prefix")
    options = {}
    if scheme(uri) in S3_SCHEMES:
        options = (storage or StorageConfig()).s3fs_options()
    elif scheme(uri) == "file":
        uri = os.path.abspath(uri.removeprefix("file://"))
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {uri}: {err}") from None
    return fs, path.rstrip("/") or path


def join(*parts: str) -> str:
    """Join path segments with "/" (object keys and local paths alike)."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` so that no reader ever sees a partial file."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    try:
        fs.pipe_file(path, data)  # a single PUT: the object appears whole or not at all
    except PermissionError as err:
        raise StorageError(f"writing {path} was refused ({err}); check the credentials") from None


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole file; StorageError naming the path when it is missing or forbidden."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise StorageError(f"{path} does not exist") from None
    except PermissionError as err:
        raise StorageError(f"reading {path} was refused ({err}); check the credentials") from None


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    fs.invalidate_cache(path)
    try:
        return fs.exists(path)
    except PermissionError as err:
        raise StorageError(f"listing {path} was refused ({err}); check the credentials") from None


def list_files(fs: fsspec.AbstractFileSystem, folder: str, suffix: str) -> dict[str, int]:
    """{path: size} of the files directly under `folder` whose names end with `suffix`."""
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return {}
    except PermissionError as err:
        raise StorageError(f"listing {folder} was refused ({err}); check the credentials") from None
    return {
        e["name"]: int(e["size"])
        for e in entries
        if e["type"] == "file" and e["name"].endswith(suffix)
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
