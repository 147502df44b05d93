"""Session-scoped fixtures for real services: SeaweedFS S3 servers and a local Ray cluster.

Both start on first use and stop at the end of the session. Every S3 server binds 127.0.0.1
on fixed ports found free from a base (the shared one from 18433, extra ones from 18533;
see `pipeline.dev.s3server.ports`), so a second test session on the machine does not collide, and
requires its credentials. `s3_servers` starts extra servers (own ports, data folder and
credentials) that a test may stop and restart on the same data; the Ray cluster has 2 CPUs,
no dashboard, and token auth disabled.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

S3_PORT = 18433
S3_BUCKET = "ctrak-test"
S3_KEY, S3_SECRET = "ctrak-test-key", "ctrak-test-secret"


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_s3_port(first: int) -> int:
    """The first S3 port from `first` (in steps of 20) whose derived ports are all free."""
    from pipeline.dev.s3server import ports

    for base in range(first, first + 2000, 20):
        if all(_free(p) for p in ports(base).values() if p):
            return base
    raise RuntimeError(f"no free port range for a test S3 server from {first}")


class S3Servers:
    """Extra SeaweedFS servers for one session: `start(name, ...)` a new one on free ports,
    `stop(server)`, and `restart(server)` on its ports and data folder (an outage)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: dict[str, object] = {}  # endpoint -> DevS3 (the live process)
        self.names: dict[str, str] = {}  # endpoint -> its data folder's name
        self.next_port = 18533

    def start(self, name: str, key: str = S3_KEY, secret: str = S3_SECRET, port: int = 0):
        from pipeline.dev.s3server import start

        port = port or free_s3_port(self.next_port)
        self.next_port = port + 20
        server = start(self.root / name, s3_port=port, bucket=S3_BUCKET, key=key, secret=secret)
        self.running[server.endpoint_url] = server
        self.names[server.endpoint_url] = name
        return server

    def stop(self, server) -> None:
        live = self.running.pop(server.endpoint_url, None)
        if live is not None:
            live.stop()

    def restart(self, server):
        """The same server (port, data, credentials) started again after `stop`."""
        self.stop(server)
        port = int(server.endpoint_url.rsplit(":", 1)[1])
        name = self.names[server.endpoint_url]
        return self.start(name, server.key, server.secret, port=port)

    def close(self) -> None:
        for server in list(self.running.values()):
            self.stop(server)


@pytest.fixture(scope="session")
def s3_servers(tmp_path_factory):
    """Start extra S3 servers (stopped at the end of the session)."""
    servers = S3Servers(tmp_path_factory.mktemp("seaweedfs-extra"))
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 gateway: its DevS3 (endpoint_url, bucket, key, secret)."""
    from pipeline.dev.s3server import start

    server = start(
        tmp_path_factory.mktemp("seaweedfs"),
        s3_port=free_s3_port(S3_PORT),
        bucket=S3_BUCKET,
        key=S3_KEY,
        secret=S3_SECRET,
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_storage(s3_server):
    """A StorageConfig reaching the test server with its credentials."""
    from pipeline.config import StorageConfig

    return StorageConfig(
        endpoint_url=s3_server.endpoint_url,
        region="us-east-1",
        key=s3_server.key,
        secret=s3_server.secret,
    )


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the session (2 CPUs, no dashboard)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",  # a new cluster, never one left running on the machine
        num_cpus=2,
        include_dashboard=False,
        logging_level="WARNING",
        configure_logging=True,
        log_to_driver=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()
