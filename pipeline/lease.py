"""The writer's lease: one featurize/reindex job at a time per store; readers never need it.

    <store>/lease.json   {"owner": {job, host, pid, user, started, token}, "expires": unix s,
                          "ttl_s": s}

A writer takes the lease before any work (`hold_lease`), renews it every ttl/3 from a
background thread, checks it before every shard it writes (`Lease.check`: a lease lost to
another writer after a stall past its expiry stops this one - StoreLockedError) and deletes
it at the end. A second writer refuses with StoreLockedError naming the running job, or waits
up to job.lease_wait_s for it. A crashed owner's lease expires after job.lease_ttl_s; one
whose owner ran on this host under a pid that no longer exists (or in this process, in a job
that has ended) is expired at once: a rerun after a killed driver does not wait.

Taking it is a conditional create that only one writer can win:
- object storage: PUT with `If-None-Match: *` (a new lease) or `If-Match: <etag>` (taking an
  expired one over, renewing our own); a 412 means another writer won. AWS S3 has both since
  2024; SeaweedFS 4.48 (the test server) enforces both, also under 6 concurrent PUTs (tried);
  release is a DELETE with `If-Match`;
- a local disk (or a shared POSIX mount): the read-decide-write runs under an exclusive
  `flock` of `<store>/lease.lock`, the lease itself is replaced atomically.

Queries only read shard files through their done-markers and the Fisher through its marker
(each written last), so they never see a half-written state and never touch the lease.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import StorageError, StoreLockedError
from pipeline.storage import redact, write_atomic
from pipeline.store import FeatureStore

log = logging.getLogger("ctrak.lease")
LEASE = "lease.json"


def _precondition_failed(err: BaseException) -> bool:
    for node in (err, err.__cause__, err.__context__):
        response = getattr(node, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code", "")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (
                409,
                412,
            ):
                return True
    return "pre-condition" in str(err) or "Precondition" in str(err)


_HELD: set[str] = set()  # tokens of the leases this process holds now


def _alive(owner: dict) -> bool:
    """False only when the owner ran on this host under a pid that no longer exists, or in
    this process in a job that has ended (a lease it could not delete, e.g. during an
    outage)."""
    if owner.get("host") != socket.gethostname():
        return True
    if owner.get("pid") == os.getpid():
        return owner.get("token") in _HELD
    try:
        os.kill(int(owner.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def describe(body: dict) -> str:
    """ "reindex by user@host pid 123, started 2026-... UTC; its lease expires in 80 s"."""
    owner = body.get("owner", {})
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(owner.get("started", 0)))
    left = body.get("expires", 0) - time.time()
    return (
        f"{owner.get('job', '?')} by {owner.get('user', '?')}@{owner.get('host', '?')} pid "
        f"{owner.get('pid', '?')}, started {started} UTC; its lease expires in {left:.0f} s"
    )


@dataclass
class Lease:
    """A held lease (see the module doc)."""

    store: FeatureStore
    job: str
    ttl_s: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    etag: str = ""  # object storage: the ETag of our last write
    lost: str = ""  # set by the heartbeat when another writer holds the lease
    started: float = field(default_factory=time.time)

    # ---- the object ------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.store.path(LEASE)

    @property
    def local(self) -> bool:
        return isinstance(self.store.fs, LocalFileSystem)

    def body(self) -> bytes:
        owner = {
            "job": self.job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": getpass.getuser(),
            "started": self.started,
            "token": self.token,
        }
        body = {"owner": owner, "expires": time.time() + self.ttl_s, "ttl_s": self.ttl_s}
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    def _read(self) -> tuple[dict | None, str]:
        """(the lease's body or None when absent, its ETag on object storage)."""
        fs = self.store.fs
        try:
            if self.local:
                with open(self.path, "rb") as handle:
                    data, etag = handle.read(), ""
            else:
                # the ETag first, then the body: the body is as new as the ETag or newer, so
                # a takeover decided on it and conditioned on that ETag is never wrong
                bucket, key = self.path.split("/", 1)
                what = f"reading {self.path}"
                head = self.store.retry.call(
                    what, fs.call_s3, "head_object", Bucket=bucket, Key=key
                )
                etag = head["ETag"]
                data = self.store.retry.call(what, fs.cat_file, self.path)
        except FileNotFoundError:
            return None, ""
        try:
            body = json.loads(data)
        except ValueError:
            body = {"owner": {"job": "an unreadable lease"}, "expires": 0}  # expired
        return body, etag

    def _put(self, if_none_match: bool, etag: str) -> bool:
        """Object storage: one conditional PUT; False when another writer won."""
        bucket, key = self.path.split("/", 1)
        condition = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": etag}
        try:
            answer = self.store.retry.call(
                f"writing {self.path}",
                self.store.fs.call_s3,
                "put_object",
                Bucket=bucket,
                Key=key,
                Body=self.body(),
                **condition,
            )
        except Exception as err:
            if _precondition_failed(err):
                return False
            raise
        self.etag = answer.get("ETag", "")
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.store.path("lease.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ---- taking, renewing, releasing -----------------------------------------------------
    def try_take(self) -> dict | None:
        """Take the lease if it is free, expired or ours: None; else the holder's body."""
        _HELD.add(self.token)  # before the write: this process's other jobs see it live
        if self.local:
            with self._locked():
                body, _ = self._read()
                if body is not None and not self._free(body):
                    return body
                write_atomic(self.store.fs, self.path, self.body())
                return None
        body, etag = self._read()
        if body is not None and not self._free(body):
            return body
        if self._put(if_none_match=body is None, etag=etag):
            return None
        body, _ = self._read()  # another writer won the race
        return body or {"owner": {"job": "another writer"}, "expires": time.time()}

    def _free(self, body: dict) -> bool:
        owner = body.get("owner", {})
        if owner.get("token") == self.token:
            return True
        return body.get("expires", 0) <= time.time() or not _alive(owner)

    def renew(self) -> None:
        """Extend our lease; sets `lost` when another writer holds it now."""
        if self.local:
            with self._locked():
                body, _ = self._read()
                if body is None or body.get("owner", {}).get("token") != self.token:
                    self.lost = describe(body) if body else "the lease was deleted"
                    return
                write_atomic(self.store.fs, self.path, self.body())
            return
        if not self._put(if_none_match=False, etag=self.etag):
            body, _ = self._read()
            self.lost = describe(body) if body else "the lease was deleted"

    def check(self) -> None:
        """StoreLockedError when the lease was lost (this writer must stop writing)."""
        if self.lost:
            raise StoreLockedError(
                f"this job lost the writer's lease of {self.store.uri} (it stalled past "
                f"job.lease_ttl_s={self.ttl_s:g} s) to {self.lost}; finished shards are "
                "kept: rerun once that job is done"
            )

    def release(self) -> None:
        _HELD.discard(self.token)
        try:
            if self.local:
                with self._locked():
                    body, _ = self._read()
                    if body is not None and body.get("owner", {}).get("token") == self.token:
                        os.unlink(self.path)
                return
            bucket, key = self.path.split("/", 1)
            self.store.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
        except Exception as err:  # it expires anyway: never fail a finished job over it
            if not _precondition_failed(err):
                log.warning("could not delete the lease %s: %s", self.path, redact(err))


def take_lease(store: FeatureStore, job: str, ttl_s: float, wait_s: float = 0.0) -> Lease:
    """A held lease, or StoreLockedError naming the running job (after `wait_s` seconds of
    polling when > 0)."""
    lease = Lease(store, job, ttl_s)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            holder = lease.try_take()
        except StorageError:
            _HELD.discard(lease.token)
            raise
        except OSError as err:
            _HELD.discard(lease.token)
            raise StorageError(f"taking the lease {lease.path} failed: {redact(err)}") from None
        if holder is None:
            return lease
        _HELD.discard(lease.token)
        if time.monotonic() >= deadline:
            raise StoreLockedError(
                f"another job is writing the store {store.uri}: {describe(holder)}. Wait for "
                "it (or set job.lease_wait_s to wait), or, if it crashed on another node, "
                f"let its lease expire (job.lease_ttl_s) or delete {store.uri}/{LEASE}. "
                "Queries need no lease"
            )
        log.info("waiting for the lease of %s: %s", store.uri, describe(holder))
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


@contextlib.contextmanager
def hold_lease(store: FeatureStore, job: str, ttl_s: float, wait_s: float = 0.0):
    """Take the lease, renew it every ttl/3 while the block runs, release it afterwards."""
    lease = take_lease(store, job, ttl_s, wait_s)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                lease.renew()
            except Exception as err:  # an outage: retried at the next beat
                log.warning("renewing the lease %s failed: %s", lease.path, redact(err))

    thread = threading.Thread(target=beat, name="ctrak-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join()
        lease.release()
