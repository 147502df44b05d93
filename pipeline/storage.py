"""Local paths and s3:// URIs behind one fsspec interface, with atomic writes and retries.

- `filesystem(uri, storage)` -> (fs, path): s3fs for s3://, the local disk for plain paths;
  `retry_policy(uri, storage)` -> the `Retry` of that URI (none for local paths);
- `write_atomic(fs, path, data)`: on a local disk a temporary sibling then `os.replace` (a
  reader sees the old file or the new one, never half of one); on object storage one PUT (an
  object appears whole or not at all). Multi-file artifacts add a marker written LAST;
- `list_files(fs, folder, suffix)`: a fresh listing (fsspec caches listings per instance,
  which would hide files another process wrote since).

Object storage flakes: a connection refused or reset, a timeout, a 5xx or a throttling answer
is retried with exponential backoff (0.5 s doubling to 15 s, jittered) for as long as
`storage.retry_limit_s` seconds of continuous failure; then `StorageUnavailableError` names
the endpoint and the operation. botocore's own retries are cut to a single one (a stale pooled
connection), so this is the one retry policy. A missing object or a refused request (an
answer, not an outage) is not retried.

Errors carry the URI and the fix, never the credentials (`redact`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ctrak.errors import CtrakError
from pipeline.config import StorageConfig
from pipeline.errors import (
    MissingFileError,
    StorageError,
    StorageUnavailableError,
    StoreWriteError,
)

log = logging.getLogger("ctrak.storage")
S3_SCHEMES = ("s3", "s3a")
T = TypeVar("T")
# answers that mean "not now" rather than "no"
RETRIED_STATUS = {429, 500, 502, 503, 504}
RETRIED_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}
DEFINITIVE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRETS: set[str] = set()  # credentials this process handed to a client: scrubbed from text


def redact(text: object) -> str:
    """str(text) without any credential this process uses or URL user-info (user:pass@)."""
    out = re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))
    secrets = {*_SECRETS, *(os.environ.get(name, "") for name in SECRET_ENV)}
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # a shorter "secret" would blank ordinary words
            out = out.replace(secret, "***")
    return out


def transient(err: BaseException) -> bool:
    """Whether an object-storage error may go away on retry (connection refused or reset,
    timeout, 5xx, throttling) rather than being an answer (missing, forbidden, invalid)."""
    if isinstance(err, (*DEFINITIVE, CtrakError)):
        return False
    for node in (err, err.__cause__):
        response = getattr(node, "response", None)  # botocore ClientError
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status in RETRIED_STATUS or response["Error"].get("Code") in RETRIED_CODES
    if isinstance(err, OSError | TimeoutError):  # incl. ConnectionRefusedError, ResetError
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return False
    if isinstance(err, BotoConnectionError | HTTPClientError):
        return True
    return type(err).__module__.split(".")[0] == "aiohttp"  # ClientConnectionError & co


@dataclass(frozen=True)
class Retry:
    """How transient errors of one object store are retried: for up to `limit_s` seconds of
    continuous failure. `endpoint` names the store in messages ("" = a local disk: no retry)."""

    endpoint: str = ""
    limit_s: float = 0.0
    first_s: float = 0.5
    max_s: float = 15.0

    def backoff(self) -> Backoff:
        return Backoff(self)

    def call(self, what: str, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args, **kwargs), retried on transient errors; `what` ("reading s3://...")
        names the operation in the warning and in StorageUnavailableError."""
        backoff = self.backoff()
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                backoff.wait(err, what)


NO_RETRY = Retry()


class Backoff:
    """One outage: `wait(err, what)` re-raises a definitive error, sleeps before the next try
    of a transient one, or raises StorageUnavailableError once `limit_s` have passed since the
    first failure; `reset()` after progress starts a new outage."""

    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.reset()

    def reset(self) -> None:
        self.since: float | None = None
        self.delay = self.retry.first_s

    def wait(self, err: Exception, what: str) -> None:
        retry = self.retry
        if not retry.endpoint or not transient(err):
            raise err
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        left = self.since + retry.limit_s - now
        if left <= 0:
            raise StorageUnavailableError(
                f"object storage at {retry.endpoint} failed for {now - self.since:.0f} s "
                f"(storage.retry_limit_s={retry.limit_s:g}) while {what}: "
                f"{type(err).__name__}: {redact(err)}. Finished work is kept: rerun the same "
                "command once the endpoint answers again"
            ) from None
        pause = min(self.delay * random.uniform(0.5, 1.0), left)
        log.warning(
            "object storage at %s: %s while %s; retrying in %.1f s",
            retry.endpoint,
            type(err).__name__,
            what,
            pause,
        )
        time.sleep(pause)
        self.delay = min(self.delay * 2, retry.max_s)


def scheme(uri: str) -> str:
    """ "s3" for s3://bucket/key, "file" for a plain path, else the URI's protocol."""
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def retry_policy(uri: str, storage: StorageConfig | None = None) -> Retry:
    """The retries of `uri`'s store: object storage retries for storage.retry_limit_s; a
    local path never retries (its errors are answers)."""
    if scheme(uri) not in S3_SCHEMES:
        return NO_RETRY
    storage = storage or StorageConfig()
    endpoint = redact(storage.endpoint_url) if storage.endpoint_url else "the AWS S3 default"
    return Retry(endpoint=endpoint, limit_s=storage.retry_limit_s)


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
        _SECRETS.update(str(options[n]) for n in ("key", "secret", "token") if options.get(n))
    elif scheme(uri) == "file":
        uri = os.path.abspath(uri.removeprefix("file://"))
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as err:
        raise StorageError(f"cannot open {redact(uri)}: {redact(err)}") from None
    return fs, path.rstrip("/") or path


def join(*parts: str) -> str:
    """Join path segments with "/" (object keys and local paths alike)."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def write_atomic(
    fs: fsspec.AbstractFileSystem, path: str, data: bytes, retry: Retry = NO_RETRY
) -> None:
    """Write `data` at `path` so that no reader ever sees a partial file."""
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as err:  # ENOSPC, EROFS, EACCES, EDQUOT, EIO: name the path
            raise StoreWriteError(
                f"writing {path} ({len(data)} bytes) failed: {err.strerror or err} "
                f"[errno {err.errno}]",
                path=path,
                errno=err.errno or 0,
                size=len(data),
            ) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    try:
        # a single PUT: the object appears whole or not at all, so retrying it is safe
        retry.call(f"writing {path}", fs.pipe_file, path, data)
    except PermissionError as err:
        raise StorageError(
            f"writing {path} was refused ({redact(err)}); check the credentials"
        ) from None


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, retry: Retry = NO_RETRY) -> bytes:
    """The whole file; StorageError naming the path when it is missing or forbidden."""
    try:
        return retry.call(f"reading {path}", fs.cat_file, path)
    except FileNotFoundError:
        raise MissingFileError(f"{path} does not exist") from None
    except PermissionError as err:
        raise StorageError(
            f"reading {path} was refused ({redact(err)}); check the credentials"
        ) from None


def exists(fs: fsspec.AbstractFileSystem, path: str, retry: Retry = NO_RETRY) -> bool:
    fs.invalidate_cache(path)
    try:
        return retry.call(f"looking up {path}", fs.exists, path)
    except PermissionError as err:
        raise StorageError(
            f"listing {path} was refused ({redact(err)}); check the credentials"
        ) from None


def list_files(
    fs: fsspec.AbstractFileSystem, folder: str, suffix: str, retry: Retry = NO_RETRY
) -> dict[str, int]:
    """{path: size} of the files directly under `folder` whose names end with `suffix`."""
    fs.invalidate_cache(folder)
    try:
        entries = retry.call(f"listing {folder}", fs.ls, folder, detail=True)
    except FileNotFoundError:
        return {}
    except PermissionError as err:
        raise StorageError(
            f"listing {folder} was refused ({redact(err)}); check the credentials"
        ) from None
    return {
        e["name"]: int(e["size"])
        for e in entries
        if e["type"] == "file" and e["name"].endswith(suffix)
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
