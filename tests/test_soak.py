"""The soak (pipeline/soak.py) at CI size: 8 shards of 2 rows on real S3 (SeaweedFS), two
rounds - a featurize actor killed, the S3 server restarted mid-reindex - with queries running
beside each; after every round the store equals the clean one (0 rows lost, 0 duplicated),
every query answered or refused with a named error. The large run (1,000 shards, 20 rounds,
random faults incl. driver kills): `python -m pipeline.soak`, its table in docs/soak-1000.md."""

from __future__ import annotations

from pipeline.soak import run_soak


def test_soak_rounds_end_equal_to_a_clean_store(pixel_model_dir, ray_cluster, tmp_path):
    report = run_soak(
        str(tmp_path / "soak"),
        str(pixel_model_dir),
        shards=8,
        rows=2,
        rounds=2,
        redo=2,
        faults=("actor-exit", "s3-restart"),
        cycle=True,
        log=lambda line: None,
    )
    assert [r["fault"] for r in report["rounds"]] == ["actor-exit", "s3-restart"]
    for r in report["rounds"]:
        assert (r["lost"], r["duplicated"], r["equal"]) == (0, 0, True), r
        assert (
            "errors" not in r["queries"]
            and sum(v for k, v in r["queries"].items() if k != "errors") >= 1
        ), r
    assert report["ok"] and report["measure"]["list_shards"]["seconds"] >= 0
