"""`ctrak bench --quick` end to end: the JSON's structure and sanity, and the benchmark's own
math against independent references. Timing targets are read off the benchmark's output on a
quiet machine, never asserted here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ctrak.kernel import fit_kernel, gram, scores, solve
from pipeline.bench.quality import exact_scores, spearman, topk_overlap


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    from jobs.cli import main

    folder = tmp_path_factory.mktemp("bench")
    out = folder / "bench.json"
    assert main(["bench", "--quick", "--json", str(out), "--workdir", str(folder / "w")]) == 0
    return json.loads(out.read_text())


def test_json_has_every_section_and_the_environment(bench):
    assert {"toy", "sd", "query", "memory", "models", "environment", "rows"} <= set(bench)
    env = bench["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == 1
    assert env["cpu"] and env["date_utc"]
    for row in bench["rows"]:
        assert {"section", "name", "value", "unit", "target", "verdict"} <= set(row)
        assert math.isfinite(row["value"])
        assert (row["verdict"] is None) == (row["target"] is None)
        assert row["verdict"] in (None, "PASS", "FAIL")


@pytest.mark.parametrize("model", ["toy", "sd"])
def test_speed_numbers_are_sane_and_fe_counted_equals_analytic(bench, model):
    s = bench[model]["speed"]
    assert s["naive"]["s_per_sample"] > 0 and s["default"]["s_per_sample"] > 0
    assert s["speedup"] > 0 and s["efficiency"] > 0 and s["forward_s_per_sample"] > 0
    assert s["default"]["fe_counted"] == s["default"]["fe_analytic"]["total"]
    # 10-step unguided inversion to t=899 (9 forwards) + 9 timesteps x (1 + 2 + 2)
    assert s["default"]["fe_analytic"]["total"] == 9 + 9 * 5
    # 50-step CFG inversion to t=899 (45 steps x 2) + 9 timesteps x (3 + 3)
    assert s["naive"]["fe_analytic"]["total"] == 90 + 9 * 6
    assert s["naive"]["config"]["projection_path"] == "exact"
    assert s["default"]["config"]["projection_path"] == "factored"


def test_quality_metrics_lie_in_their_ranges(bench):
    q = bench["toy"]["quality"]
    assert len(q["per_query"]) == 4
    assert {"spearman_dense_small", "top10_overlap_dense_small", "p@10_dense_small"} <= set(
        q["mean"]
    )
    for name, value in q["mean"].items():
        low = -1.0 if name.startswith("spearman") else 0.0
        assert low - 1e-9 <= value <= 1.0 + 1e-9, name


def test_storage_query_and_memory_are_sane(bench):
    query = bench["query"]
    assert query["feature_bytes_per_sample"] <= 2048  # k = 1024 float16
    assert query["parquet_bytes_per_row"] > 0
    scan = query["product_scan"]
    assert scan["rows"] == 20_000 and scan["rows_per_s"] > 0 and scan["ratio_to_copy"] > 0
    assert scan["top_agreement_with_float64"] == 1.0  # the float32 screen loses nothing
    assert query["arithmetic_ceiling"]["rows_per_s"] > 0
    one = query["product_scan_1_query"]  # the memory-bound case, next to the 8-query scan
    assert scan["queries"] == 8 and one["queries"] == 1
    assert one["rows"] == scan["rows"] and one["ratio_to_copy"] > 0
    assert one["top_agreement_with_float64"] == 1.0
    for run in (scan, one):  # each against the copy measured beside it, 3 rounds
        beside = run["copy_beside_scan_bytes_per_s"]
        assert run["ratio_to_copy"] == pytest.approx(run["scan_bytes_per_s"] / beside)
        assert len(run["rounds"]) == 3
        assert sorted(r["ratio"] for r in run["rounds"])[1] == pytest.approx(run["ratio_to_copy"])
    assert query["arithmetic_ceiling_1_query"]["rows_per_s"] > 0
    targets = {r["name"]: r for r in bench["rows"] if r["name"].startswith("scan / copy")}
    assert set(targets) == {"scan / copy bandwidth, 8 queries", "scan / copy bandwidth, 1 query"}
    for row in targets.values():
        assert row["target"] == 0.5 and row["verdict"] in ("PASS", "FAIL")
    assert targets["scan / copy bandwidth, 1 query"]["value"] == one["ratio_to_copy"]
    assert query["fisher"]["total_s_per_1m_rows"] > 0
    for ratio in (scan["peak_ratio"], bench["memory"]["featurize"]["peak_ratio"]):
        assert ratio > 0


def test_exact_scores_dual_form_equals_the_primal_kernel():
    """g (G^T G + lam I)^-1 G^T with lam = 0.1 trace / D, solved n x n, equals ctrak.kernel's
    D x D solve when the features are the unprojected gradients themselves."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 12, generator=gen, dtype=torch.float64)
    primal = scores(G, solve(fit_kernel(gram(G), 1.0), g))
    torch.testing.assert_close(exact_scores(G, g, 1.0), primal)


def test_rank_metrics_on_known_cases():
    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert topk_overlap(a, torch.tensor([4.0, 3.0, 2.0, 1.0]), 2) == 0.5
