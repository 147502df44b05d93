"""Session-scoped fixtures for real services: a SeaweedFS S3 server and a local Ray cluster.

Both start on first use and stop at the end of the session. The S3 server binds 127.0.0.1 on
fixed ports (S3 on 18433, the rest derived, see `pipeline.devs3.ports`) and requires the test
credentials below; the Ray cluster has 2 CPUs, no dashboard, and token auth disabled.
"""

from __future__ import annotations

import os

import pytest

S3_PORT = 18433
S3_BUCKET = "ctrak-test"
S3_KEY, S3_SECRET = "ctrak-test-key", "ctrak-test-secret"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 gateway: its DevS3 (endpoint_url, bucket, key, secret)."""
    from pipeline.devs3 import start

    server = start(
        tmp_path_factory.mktemp("seaweedfs"),
        s3_port=S3_PORT,
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
