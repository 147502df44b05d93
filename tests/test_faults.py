"""Faults during a featurize/reindex job lose nothing: every row ends up in the store exactly
once and the Fisher equals a clean run's.

1. a featurize actor dies mid-shard (CTRAK_FAULT=actor-exit:...): Ray restarts it and retries
   the batch; the retried rows are counted once;
2. the driver is SIGKILLed after its first shard (CTRAK_FAULT=driver-kill:...): a rerun
   redoes only the unfinished shards;
3. the S3 server stops mid-job: transient errors are retried with backoff and the job
   finishes once it is back; if it stays down past storage.retry_limit_s the job fails naming
   the endpoint (never the credentials), and a rerun completes.

The data: 9 images of the paper world in 3 shards of 3, featurized by the tiny pixel model.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig
from ctrak.toy.world_shards import generate_world
from jobs.cli import main
from pipeline.cluster import ray_session
from pipeline.config import JobConfig, PipelineConfig, RayConfig, StorageConfig
from pipeline.errors import StorageUnavailableError
from pipeline.feature_file import table_features
from pipeline.fisher import current_kernel
from pipeline.ingest import ingest
from pipeline.shards import decode_shard
from pipeline.storage import Retry
from pipeline.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTION = AttributionConfig(
    gradient=GradientConfig(timesteps=(499, 899)), projection=ProjectionConfig(k=32)
)
SETTINGS = [
    "attribution.projection.k=32",
    "attribution.gradient.timesteps=[499, 899]",
    "job.batch_size=2",
    'job.feature_dtype="float32"',
    "--no-progress",
]


def _config(model_dir, data, store, storage=None) -> PipelineConfig:
    job = JobConfig(
        data=str(data),
        store=str(store),
        model=str(model_dir),
        batch_size=2,
        feature_dtype="float32",
    )
    return PipelineConfig(
        job=job,
        storage=storage or StorageConfig(),
        ray=RayConfig(progress=False),
        attribution=ATTRIBUTION,
    )


def _contents(store: FeatureStore) -> dict:
    """{"keys": [...] in store order, "features": {key: (k,)}, "K": Fisher (k, k)}; checks
    that no file of an unfinished shard or temporary file is left."""
    entries = store.entries()
    keys, features = [], {}
    for _, entry in sorted(entries.items()):
        table = store.read_features(entry)
        for key, phi in zip(table.column("key").to_pylist(), table_features(table), strict=True):
            keys.append(key)
            features[key] = phi
        assert store.read_rejects(entry).num_rows == 0
    for folder, suffix in (("features", ".parquet"), ("grams", ".npy"), ("rejects", ".parquet")):
        store.fs.invalidate_cache()
        names = sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.path(folder)))
        assert names == [f"{s}{suffix}" for s in sorted(entries)], folder
    kernel, info = current_kernel(store, 1.0)
    assert info["rows"] == len(keys)
    return {"shards": sorted(entries), "keys": keys, "features": features, "K": kernel.K}


def assert_like_clean(store: FeatureStore, clean: dict) -> None:
    """Every row exactly once, features and Fisher equal to the clean run's (float32 rounding:
    the engine's batched matmuls depend slightly on which rows share a batch)."""
    got = _contents(store)
    assert got["shards"] == clean["shards"]
    assert len(got["keys"]) == len(set(got["keys"])), "a row was stored twice"
    assert sorted(got["keys"]) == sorted(clean["keys"]), "a row was lost"
    for key in clean["keys"]:
        np.testing.assert_allclose(
            got["features"][key], clean["features"][key], rtol=1e-4, atol=1e-5
        )
    torch.testing.assert_close(got["K"], clean["K"], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fault-data") / "paper"
    generate_world("paper", str(folder), num_images=9, image_size=16, shard_size=3, seed=2)
    return folder


@pytest.fixture(scope="module")
def clean(data, pixel_model_dir, ray_cluster, tmp_path_factory):
    """The clean run's store contents (a local store)."""
    store = tmp_path_factory.mktemp("fault-clean") / "store"
    config = _config(pixel_model_dir, data, store)
    with ray_session(config.ray):
        summary = ingest(config, create=True, progress=False)
    assert (summary.written, summary.rows, summary.rejected) == (3, 9, 0)
    return _contents(FeatureStore(str(store)))


# ---- 1. a featurize actor dies mid-shard --------------------------------------------------
def test_dead_featurize_actor_loses_no_row(data, clean, pixel_model_dir, tmp_path, monkeypatch):
    fired = tmp_path / "actor-exit.fired"
    # the actor exits in the batch holding row 2 of shard 00001 (rows 0-1 came in an earlier
    # batch of the same shard); the marker makes it fire once
    monkeypatch.setenv("CTRAK_FAULT", f"actor-exit:shard=00001:row=2:once={fired}")
    config = _config(pixel_model_dir, data, tmp_path / "store")
    with ray_session(config.ray):
        summary = ingest(config, create=True, progress=False)
    assert fired.exists(), "the fault did not fire"
    assert (summary.written, summary.rows, summary.rejected) == (3, 9, 0)
    assert_like_clean(FeatureStore(config.job.store), clean)


# ---- 2. the driver dies mid-job ------------------------------------------------------------
@pytest.mark.slow
def test_killed_driver_rerun_redoes_only_unfinished_shards(
    data, clean, pixel_model_dir, ray_cluster, tmp_path
):
    store = tmp_path / "store"
    args = [f"job.data={data}", f"job.store={store}", f"job.model={pixel_model_dir}", *SETTINGS]
    address = ray_cluster.get_runtime_context().gcs_address
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "RAY_AUTH_MODE": "disabled",
        "CTRAK_FAULT": "driver-kill:after=1",
    }
    killed = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "featurize", "--address", address, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no clean-up ran
    assert len(FeatureStore(str(store)).done_ids()) == 1  # the shard written before the kill
    summary = tmp_path / "reindex.json"
    assert main(["reindex", *args, "--json", str(summary)]) == 0
    done = json.loads(summary.read_text())
    assert (done["skipped"], done["written"], done["rows"]) == (1, 2, 6)
    assert_like_clean(FeatureStore(str(store)), clean)


# ---- 3. object storage goes away ------------------------------------------------------------
def test_retry_backs_off_and_gives_up_naming_the_endpoint(monkeypatch):
    sleeps: list[float] = []
    clock = [0.0]

    def sleep(seconds):
        sleeps.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr("pipeline.storage.time.sleep", sleep)
    monkeypatch.setattr("pipeline.storage.time.monotonic", lambda: clock[0])
    retry = Retry(endpoint="http://127.0.0.1:9", limit_s=30.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 5:
            raise ConnectionRefusedError(111, "Connection refused")
        return b"ok"

    assert retry.call("reading s3://b/x", flaky) == b"ok"
    # exponential backoff, jittered: the i-th pause lies in [0.5, 1] x 0.5 x 2^i s
    assert [0.25 * 2**i <= s <= 0.5 * 2**i for i, s in enumerate(sleeps)] == [True] * 4
    # an answer (missing, forbidden) is not retried
    with pytest.raises(FileNotFoundError):
        retry.call("reading s3://b/y", lambda: (_ for _ in ()).throw(FileNotFoundError("y")))
    # a store that stays down: named error after the limit
    sleeps.clear()

    def down():
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(StorageUnavailableError, match=r"http://127\.0\.0\.1:9 .*reading s3://b/z"):
        retry.call("reading s3://b/z", down)
    assert 25 <= sum(sleeps) <= 30 + 1e-6
    # a local disk never retries
    with pytest.raises(ConnectionRefusedError):
        Retry().call("reading /x", down)


def test_a_dropped_read_resumes_the_shard_without_repeating_rows(data, monkeypatch):
    """decode_shard: the connection drops mid-tar; the tar is reopened after a backoff and the
    records already emitted are skipped, so every row is emitted exactly once."""
    tar = (data / "00001.tar").read_bytes()
    drops = []

    class Dropping(io.BytesIO):  # serves 512 bytes a read; the first open drops halfway
        def read(self, size=-1):
            if not drops and self.tell() > len(tar) // 2:
                drops.append(len(out))  # records emitted before the drop
                raise ConnectionResetError(104, "Connection reset by peer")
            return super().read(512 if size < 0 else min(size, 512))

    class FlakyS3:
        def open(self, path, mode):
            return Dropping(tar)

    monkeypatch.setattr("pipeline.shards.filesystem", lambda uri, storage: (FlakyS3(), uri))
    monkeypatch.setattr(
        "pipeline.shards.retry_policy", lambda uri, storage: Retry("http://s3.test:1", 10.0)
    )
    monkeypatch.setattr("pipeline.storage.time.sleep", lambda seconds: None)
    batch = {"shard": np.array(["00001"], object), "uri": np.array(["s3://b/00001.tar"], object)}
    out: list[dict] = []
    out.extend(decode_shard(batch, storage=StorageConfig(), image_size=16, rows_per_batch=1))
    rows = [int(b["row"][0]) for b in out]
    assert drops[0] >= 1 and rows == [0, 1, 2, -1]  # some rows came before the drop; none twice
    assert [b["reason"][0] for b in out] == [""] * 4 and int(out[-1]["count"][0]) == 3


@pytest.fixture(scope="module")
def outage_server(s3_servers, data):
    """A separate S3 server the tests stop and restart, holding the 3 shards."""
    server = s3_servers.start("outage", key="outage-key-7f3a", secret="outage-secret-91c2e")
    storage = StorageConfig(
        endpoint_url=server.endpoint_url, region="us-east-1", key=server.key, secret=server.secret
    )
    fs = FeatureStore(f"s3://{server.bucket}/data", storage).fs
    for tar in sorted(data.glob("*.tar")):
        fs.put_file(str(tar), f"{server.bucket}/data/{tar.name}")
    return server, storage


def _stop_during_first_write(monkeypatch, stop, restart=None, delay=2.0):
    """Make the driver stop the server just before it writes its first shard (mid-job: the
    decode tasks are reading too), and restart it `delay` s later when `restart` is given."""
    original = FeatureStore.write_shard
    state: dict = {}

    def write_shard(self, *args, **kwargs):
        if not state:
            state["stopped"] = True
            stop()
            if restart is not None:
                state["timer"] = threading.Timer(delay, lambda: state.update(back=restart()))
                state["timer"].start()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_shard", write_shard)
    return state


@pytest.mark.slow
def test_s3_restart_mid_job_is_retried(
    outage_server, s3_servers, clean, pixel_model_dir, ray_cluster, monkeypatch, caplog
):
    server, storage = outage_server
    store = f"s3://{server.bucket}/stores/restart"
    config = _config(pixel_model_dir, f"s3://{server.bucket}/data", store, storage)
    state = _stop_during_first_write(
        monkeypatch, lambda: s3_servers.stop(server), lambda: s3_servers.restart(server)
    )
    with caplog.at_level(logging.WARNING, logger="ctrak.storage"), ray_session(config.ray):
        summary = ingest(config, create=True, progress=False)
    state["timer"].join()
    assert state["back"].endpoint_url == server.endpoint_url
    retried = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retried and server.endpoint_url in retried[0]  # the outage was met and retried
    assert (summary.written, summary.rows) == (3, 9)
    assert_like_clean(FeatureStore(store, storage), clean)


@pytest.mark.slow
def test_s3_down_past_the_limit_fails_naming_the_endpoint_then_rerun_completes(
    outage_server, s3_servers, clean, pixel_model_dir, ray_cluster, monkeypatch
):
    server, storage = outage_server
    short = replace(storage, retry_limit_s=2.0)
    store = f"s3://{server.bucket}/stores/down"
    config = _config(pixel_model_dir, f"s3://{server.bucket}/data", store, short)
    _stop_during_first_write(monkeypatch, lambda: s3_servers.stop(server))
    try:
        with ray_session(config.ray), pytest.raises(StorageUnavailableError) as err:
            ingest(config, create=True, progress=False)
    finally:
        monkeypatch.undo()
        s3_servers.restart(server)
    message = str(err.value)
    assert server.endpoint_url in message and "storage.retry_limit_s=2" in message
    assert server.key not in message and server.secret not in message
    assert "rerun" in message
    # the rerun (reindex) with the default retry window: a restarted server may answer
    # "internal error" for a few seconds while its volumes load (seen on a loaded machine)
    rerun = _config(pixel_model_dir, f"s3://{server.bucket}/data", store, storage)
    with ray_session(rerun.ray):
        summary = ingest(rerun, create=False, progress=False)
    assert summary.written + summary.skipped == 3
    assert_like_clean(FeatureStore(store, storage), clean)
