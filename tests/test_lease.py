"""Two writers on one store (issue 23, item 2): the writer's lease (pipeline/lease.py).

- on a local disk and on real S3 (SeaweedFS): of 6 writers racing for a free lease exactly
  one wins, the others get StoreLockedError naming the winner; the same for an expired one;
- a running job's lease refuses a second featurize before any work, naming the job; with
  job.lease_wait_s it waits and proceeds once the first is done;
- a crashed owner on another node: refused until its lease expires, then a rerun proceeds;
  a crashed owner on this host (dead pid): a rerun proceeds at once;
- a query (a reader) runs while a writer holds the lease.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from test_faults import _config

from ctrak.toy.world_shards import generate_world
from pipeline.cluster import ray_session
from pipeline.errors import StoreLockedError
from pipeline.ingest import ingest
from pipeline.lease import LEASE, Lease, hold_lease, take_lease
from pipeline.query import QuerySpec, run_queries
from pipeline.store import FeatureStore


def _race(store: FeatureStore, n: int = 6) -> tuple[list[Lease], list[str]]:
    barrier = threading.Barrier(n)
    won, refused = [], []

    def go(i: int) -> None:
        mine = FeatureStore(store.uri, store.storage)  # a client of its own
        barrier.wait()
        try:
            won.append(take_lease(mine, f"job-{i}", ttl_s=30))
        except StoreLockedError as err:
            refused.append(str(err))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def _stale(store: FeatureStore, host: str, pid: int, expires_in: float) -> None:
    """A lease left by a crashed writer."""
    owner = {"job": "reindex", "host": host, "pid": pid, "user": "cron", "started": 0, "token": "x"}
    body = {"owner": owner, "expires": time.time() + expires_in, "ttl_s": 60}
    store.write(store.path(LEASE), json.dumps(body).encode())


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return FeatureStore(str(tmp_path / "store"))
    s3_server, s3_storage = (
        request.getfixturevalue("s3_server"),
        request.getfixturevalue("s3_storage"),
    )
    return FeatureStore(f"s3://{s3_server.bucket}/lease-{time.monotonic_ns()}", s3_storage)


def test_exactly_one_of_racing_writers_takes_the_lease(store):
    won, refused = _race(store)
    assert len(won) == 1 and len(refused) == 5
    assert all(f"{won[0].job} by " in message for message in refused)  # names the winner
    won[0].release()
    # an expired lease (a writer on another node that crashed): again exactly one takes it
    _stale(store, "node-7", 1, expires_in=-1)
    won, refused = _race(store)
    assert len(won) == 1 and len(refused) == 5
    body = json.loads(store.read(store.path(LEASE)))
    assert body["owner"]["token"] == won[0].token
    won[0].release()
    assert not store.has(store.path(LEASE))


def test_a_crashed_owner_expires_and_one_on_this_host_is_free_at_once(store):
    _stale(store, "node-7", 1, expires_in=1.5)
    with pytest.raises(StoreLockedError, match=r"reindex by cron@node-7 pid 1"):
        take_lease(store, "featurize", ttl_s=30)
    time.sleep(1.6)
    take_lease(store, "featurize", ttl_s=30).release()
    _stale(store, socket.gethostname(), 2**22 + 7, expires_in=600)  # no such pid here
    take_lease(store, "featurize", ttl_s=30).release()


def test_a_second_writer_refuses_or_waits_and_readers_need_no_lease(
    pixel_model_dir, ray_cluster, tmp_path
):
    data = tmp_path / "data"
    generate_world("paper", str(data), num_images=4, image_size=16, shard_size=2, seed=8)
    config = _config(pixel_model_dir, data, tmp_path / "store")
    store = FeatureStore(config.job.store)
    calls = []
    with ray_session(config.ray):
        with hold_lease(store, "featurize", ttl_s=30) as first, pytest.MonkeyPatch.context() as p:
            p.setattr("pipeline.ingest.list_shards", lambda *a: calls.append(a))
            with pytest.raises(StoreLockedError, match=r"another job is writing .* featurize by"):
                ingest(config, create=True, progress=False)
            assert calls == []  # refused before any work
            assert first.lost == ""
        ingest(config, create=True, progress=False)  # the lease is free again
        # a writer holds it (waiting for 3 s): a query reads the store meanwhile
        holder = take_lease(store, "reindex", ttl_s=30)
        threading.Timer(3.0, holder.release).start()
        results, _ = run_queries(
            config, [QuerySpec("a red circle", image=np.zeros((16, 16, 3), np.uint8))], top_k=2
        )
        assert len(results[0].hits) == 2
        waiting = replace(config, job=replace(config.job, lease_wait_s=30.0))
        summary = ingest(waiting, create=False, progress=False)  # waited, then proceeded
        assert summary.skipped == 2 and not store.has(store.path(LEASE))
