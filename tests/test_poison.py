"""A row that kills its featurize actor every time (issue 23, item 3): after
job.max_worker_deaths deaths its batch's rows are retried alone; the row that kills its actor
alone too is rejected ("worker died N times"), the job finishes, the summary says so, and
every other row equals a clean run's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from test_faults import _config, _contents

from ctrak.toy.world_shards import generate_world
from pipeline.cluster import ray_session
from pipeline.feature_file import table_features
from pipeline.ingest import ingest
from pipeline.results import print_summary
from pipeline.store import FeatureStore


def test_a_poison_row_is_rejected_after_n_deaths_and_the_job_finishes(
    pixel_model_dir, ray_cluster, tmp_path, monkeypatch, capsys
):
    data = tmp_path / "data"
    generate_world("paper", str(data), num_images=6, image_size=16, shard_size=3, seed=9)
    clean_config = _config(pixel_model_dir, data, tmp_path / "clean")
    with ray_session(clean_config.ray):
        ingest(clean_config, create=True, progress=False)
    clean = _contents(FeatureStore(clean_config.job.store))
    # row 1 of shard 00001 kills its actor every time it is featurized (no `once=`)
    monkeypatch.setenv("CTRAK_FAULT", "actor-exit:shard=00001:row=1")
    config = _config(pixel_model_dir, data, tmp_path / "store")
    config = replace(config, job=replace(config.job, max_worker_deaths=1, max_reject_fraction=0.5))
    with ray_session(config.ray):
        summary = ingest(config, create=True, progress=False)
    assert (summary.written, summary.rows, summary.rejected) == (2, 5, 1)
    ((reason, count),) = summary.reasons.items()
    assert count == 1 and reason.startswith("worker died 2 times featurizing this row")
    store = FeatureStore(config.job.store)
    entries = store.entries()
    (poisoned,) = store.read_rejects(entries["00001"]).to_pylist()
    assert (poisoned["row"], poisoned["reason"]) == (1, reason)
    got = {}
    for entry in entries.values():
        table = store.read_features(entry)
        got.update(zip(table.column("key").to_pylist(), table_features(table), strict=True))
    assert sorted(got) == sorted(k for k in clean["keys"] if k != poisoned["key"])  # once each
    for key, phi in got.items():
        np.testing.assert_allclose(phi, clean["features"][key], 1e-4, 1e-5)
    print_summary(summary, "featurize")
    assert "worker died 2 times" in capsys.readouterr().out
