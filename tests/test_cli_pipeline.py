"""`ctrak featurize` and `ctrak query` end to end through `jobs.cli.main`, on a local store
(a directory) with JSON output: a run over the error budget still writes every shard and
records its rejects but exits non-zero (and so does a rerun), a larger budget passes, and the
query's top-k equals the engine's on the stored (float16) features."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ctrak.attribution import Attributor, Query
from ctrak.kernel import fit_kernel, gram, scores, solve, solve_query
from ctrak.model import DiffusionModel
from ctrak.topk import topk
from ctrak.toy.world_shards import generate_world, read_samples
from jobs.cli import main
from pipeline.config_file import load_config
from pipeline.feature_file import table_features
from pipeline.featurize import images_to_tensor
from pipeline.store import FeatureStore

SETTINGS = [
    "attribution.projection.k=32",
    "attribution.gradient.timesteps=[499, 899]",
    "job.batch_size=4",
]


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _extra_shard(path, rows) -> None:
    """One good sample and two rejects (wrong size, no caption)."""
    members = [
        ("extra0000.png", _png(rows[0]["image"])),
        ("extra0000.txt", b"a blue circle"),
        ("extra0001.png", _png(np.zeros((24, 24, 3), np.uint8))),
        ("extra0001.txt", b"big"),
        ("extra0002.png", _png(rows[1]["image"])),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("command", ["featurize", "reindex", "query"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "KEY=VALUE" in capsys.readouterr().out


def test_featurize_then_query_through_the_cli(tmp_path, pixel_model_dir, ray_cluster, capsys):
    data, store = tmp_path / "data", tmp_path / "store"
    generate_world("paper", str(data), num_images=8, image_size=16, shard_size=4, seed=1)
    rows = list(read_samples(str(data)))
    _extra_shard(data / "extra.tar", rows)
    common = [
        f"job.data={data}",
        f"job.store={store}",
        f"job.model={pixel_model_dir}",
        *SETTINGS,
        "--no-progress",
    ]
    # 1. over the default error budget (1%): every shard is written, rejects recorded, the
    #    summary printed and saved, and the run still fails
    summary_path = tmp_path / "featurize.json"
    assert main(["featurize", *common, "--json", str(summary_path)]) == 2
    out, err = capsys.readouterr()
    assert "RejectBudgetError: 2 of 11 rows" in err and "rejects/" in err
    assert "9 rows featurized, 2 rejected" in out and "missing caption" in out
    assert json.loads(summary_path.read_text())["rejected"] == 2
    # 2. a rerun reaches the same verdict without redoing anything; a larger budget passes
    assert main(["featurize", *common]) == 2
    assert "RejectBudgetError" in capsys.readouterr().err
    assert (
        main(["featurize", *common, "job.max_reject_fraction=0.5", "--json", str(summary_path)])
        == 0
    )
    summary = json.loads(summary_path.read_text())
    assert (summary["skipped"], summary["written"], summary["store_rejected"]) == (3, 0, 2)
    assert "samples/s" in capsys.readouterr().out
    feature_store = FeatureStore(str(store))
    entries = feature_store.entries()
    assert sorted(entries) == ["00000", "00001", "extra"]
    assert feature_store.read_rejects(entries["extra"]).to_pydict()["reason"] == [
        "image is 24x24, the model takes 16x16",
        "missing caption (.txt member)",
    ]
    # 3. two queries from a file, one pass
    query_image = tmp_path / "query.png"
    query_image.write_bytes(_png(rows[6]["image"]))
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        json.dumps(
            {
                "prompt": rows[6]["caption"],
                "concept": rows[6]["labels"]["shape"],
                "image": "query.png",
            }
        )
        + "\n"
        + json.dumps({"prompt": "a blue circle", "concept": "blue", "image": "query.png"})
        + "\n"
    )
    out = tmp_path / "hits.json"
    assert (
        main(["query", *common, "--queries", str(queries), "--top-k", "4", "--json", str(out)]) == 0
    )
    table = capsys.readouterr().out
    assert "rank" in table and "caption" in table and rows[6]["caption"] in table
    report = json.loads(out.read_text())
    assert report["rows"] == 9 and len(report["results"]) == 2
    # the engine on the stored float16 features (the pipeline's precision), same order
    stored = [feature_store.read_features(e) for _, e in sorted(entries.items())]
    keys = [k for t in stored for k in t.column("key").to_pylist()]
    phi = torch.cat([torch.from_numpy(table_features(t)) for t in stored])  # (9, 32) float16
    config = load_config(None, SETTINGS).attribution
    attributor = Attributor(DiffusionModel.load(pixel_model_dir), config)
    kernel = fit_kernel(gram(phi), config.damping_ratio)
    image = images_to_tensor(rows[6]["image"][None])
    g = torch.stack(
        [
            attributor.query_gradient(
                Query(rows[6]["caption"], rows[6]["labels"]["shape"], image=image)
            ),
            attributor.query_gradient(Query("a blue circle", "blue", image=image)),
        ]
    )
    expected = topk(scores(phi, solve(kernel, g)), 4)
    for j, result in enumerate(report["results"]):
        hits = result["hits"]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4]
        assert [h["key"] for h in hits] == [keys[i] for i in expected.indices[j]]
        np.testing.assert_allclose([h["score"] for h in hits], expected.values[j], atol=1e-4)
        assert set(hits[0]) == {"rank", "key", "shard", "row", "score", "caption", "metadata"}
    # 4. query.partial_rest (two directions per query, docs/method.md (15)) through the job:
    #    the engine's solved vector, the rest's direction partialled out
    rest = ["attribution.query.partial_rest=true"]
    assert (
        main(
            ["query", *common, *rest, "--queries", str(queries), "--top-k", "4", "--json", str(out)]
        )
        == 0
    )
    capsys.readouterr()
    partial = Attributor(
        DiffusionModel.load(pixel_model_dir), load_config(None, SETTINGS + rest).attribution
    )
    x = torch.stack(
        [
            solve_query(kernel, partial.query_directions(q))
            for q in (
                Query(rows[6]["caption"], rows[6]["labels"]["shape"], image=image),
                Query("a blue circle", "blue", image=image),
            )
        ]
    )
    expected = topk(scores(phi, x), 4)
    assert not torch.equal(expected.values, topk(scores(phi, solve(kernel, g)), 4).values)
    for j, result in enumerate(json.loads(out.read_text())["results"]):
        assert [h["key"] for h in result["hits"]] == [keys[i] for i in expected.indices[j]]
        np.testing.assert_allclose(
            [h["score"] for h in result["hits"]], expected.values[j], atol=1e-4
        )
