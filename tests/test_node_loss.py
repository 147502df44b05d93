"""Node loss (issue 23, item 1): a multi-node Ray cluster on this machine (in a subprocess,
apart from the session cluster; tests/multinode_job.py). The worker node running the
featurize actor is removed mid-job: the job finishes, every row is stored once, features and
Fisher equal a clean run's. The node running a query's score task is removed mid-scan: the
task is retried elsewhere and the top-k equals the clean one (never one missing shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_faults import _config, _contents, assert_like_clean

from ctrak.toy.world_shards import generate_world
from pipeline.cluster import ray_session
from pipeline.ingest import ingest
from pipeline.query import QuerySpec, run_queries
from pipeline.store import FeatureStore

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_losing_a_node_mid_featurize_and_mid_scan_loses_nothing(
    pixel_model_dir, ray_cluster, tmp_path
):
    data = tmp_path / "data"
    generate_world("paper", str(data), num_images=9, image_size=16, shard_size=3, seed=10)
    clean_config = _config(pixel_model_dir, data, tmp_path / "clean")
    spec = QuerySpec("a red circle", concept="red", image=np.full((16, 16, 3), 120, np.uint8))
    with ray_session(clean_config.ray):
        ingest(clean_config, create=True, progress=False)
        (clean_result,), _ = run_queries(clean_config, [spec], top_k=4)
    clean = _contents(FeatureStore(clean_config.job.store))
    store, out = tmp_path / "store", tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(
        PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        OMP_NUM_THREADS="1",
        RAY_AUTH_MODE="disabled",
        CTRAK_FAULT=f"scan-stall:seconds=30:once={tmp_path / 'stalled'}",
    )
    job = [sys.executable, str(ROOT / "tests" / "multinode_job.py")]
    run = subprocess.run(
        [*job, str(pixel_model_dir), str(data), str(store), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["events"][0].startswith("node A removed after shard")
    assert got["events"][1] == "node B removed mid-scan"
    assert (got["summary"]["written"], got["summary"]["rows"]) == (3, 9)
    assert_like_clean(FeatureStore(str(store)), clean)
    want = [(h.shard, h.key, h.score) for h in clean_result.hits]
    assert [h[:2] for h in got["hits"]] == [list(h[:2]) for h in want]  # every shard scanned
    np.testing.assert_allclose([h[2] for h in got["hits"]], [h[2] for h in want], rtol=1e-4)
