"""The front door: `ctrak demo` at a reduced size, as a user runs it (a fresh process that
starts its own local Ray cluster), and the shipped stores it builds on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrak.config import AttributionConfig
from ctrak.model import DiffusionModel
from ctrak.toy import DEFAULT_MODEL
from pipeline.bundle import read_bundle
from pipeline.demo import shipped_bundle
from pipeline.store import check_provenance

ROOT = Path(__file__).resolve().parent.parent
NOISE = (
    "should be kept in float32",  # diffusers, on a dtype cast after loading
    "Token authentication",  # Ray, announcing its choice for a new local cluster
    "core_worker.cc",  # Ray's C++ core worker, for every Ray Data actor pool
    "logging_progress",  # Ray Data's progress blocks where no terminal is attached
    "Running Dataset",
)


@pytest.mark.parametrize("method", ["concept-trak", "trak"])
def test_shipped_stores_match_the_shipped_model_and_the_defaults(method):
    """A change of the model or of a method's defaults makes the shipped store stale: this
    fails until it is rebuilt (ctrak/assets/toy-paper-stores/README.md)."""
    bundle = shipped_bundle(DEFAULT_MODEL, method)
    assert bundle is not None
    body = read_bundle(bundle)
    assert body["rows"] == 1200 and len(body["shards"]) == 30
    stored = json.loads((bundle / "store.json").read_text())["provenance"]
    model = DiffusionModel.load(DEFAULT_MODEL)
    from ctrak.attribution import Attributor

    actual = Attributor(model, AttributionConfig.for_method(method)).provenance()
    check_provenance(stored, actual, where=f"the defaults of {method}")


def test_demo_runs_end_to_end_quietly(tmp_path):
    out = tmp_path / "demo.json"
    # as a user runs it: no cluster address, Ray's own auth default, not verbose
    unset = ("RAY_ADDRESS", "RAY_AUTH_MODE", "CTRAK_VERBOSE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    run = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "demo", "--live-shards", "1", "--methods",
         "concept-trak", "--scope", "local", "--num-queries", "1", "--work",
         str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed[-3000:]
    assert "P@10=" in printed and "report:" in printed and "next: " in printed
    for noise in NOISE:
        assert noise not in printed, f"{noise!r} in the demo's output:\n{printed[-3000:]}"
    result = json.loads(out.read_text())
    assert {r["concept"] for r in result["results"]} == {"triangle", "red"}
    for r in result["results"]:
        hits = r["results"][0]["hits"]
        assert len(hits) == 10 and all(h["caption"].startswith("a ") for h in hits)
        assert 0.0 <= r["precision_at_k"] <= 1.0
    store = result["stores"]["concept-trak"]
    assert store["rows"] == 40 and store["store_rows"] == 1200  # 1 shard live, 29 shipped
    assert store["live_min_cosine"] > 0.999  # the live rows are the shipped rows
    html = (tmp_path / "work" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 1 + 2 * 10  # query + hits, inline
    assert (tmp_path / "work" / "report.png").stat().st_size > 1000
