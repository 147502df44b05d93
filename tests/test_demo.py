"""The front door: `ctrak demo` at a reduced size, through the same Ray pipeline."""

from __future__ import annotations

import json

from jobs.cli import main


def test_demo_runs_end_to_end_at_reduced_size(tmp_path, ray_cluster, capsys):
    out = tmp_path / "demo.json"
    code = main(
        [
            "demo",
            "--num-train",
            "12",
            "--shard-size",
            "6",
            "--num-queries",
            "1",
            "--methods",
            "concept-trak",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "P@10=" in printed and "report:" in printed
    result = json.loads(out.read_text())
    assert {r["concept"] for r in result["results"]} == {"triangle", "red"}
    for r in result["results"]:
        hits = r["results"][0]["hits"]
        assert len(hits) == 10 and all(h["caption"].startswith("a ") for h in hits)
        assert 0.0 <= r["precision_at_k"] <= 1.0
    assert result["featurize"]["concept-trak"]["rows"] == 12
    html = (tmp_path / "work" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 1 + 2 * 10  # query + hits, inline
    assert (tmp_path / "work" / "report.png").stat().st_size > 1000
