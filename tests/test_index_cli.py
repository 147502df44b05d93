"""`ctrak index`, `ctrak query --index` and `ctrak reindex` end to end through `jobs.cli.main`
on a local store: the index query prints the same hits with the same scores as the exact
scan; a shard added to the data makes `query --index` fail (StaleIndexError, exit 2) until
`ctrak reindex` adds it to the index, after which both agree again."""

from __future__ import annotations

import json

from ctrak.toy.world_shards import generate_world
from jobs.cli import main

SETTINGS = [
    "attribution.projection.k=32",
    "attribution.gradient.timesteps=[499, 899]",
    "job.batch_size=4",
]


def _hits(path) -> list:
    return [r["hits"] for r in json.loads(path.read_text())["results"]]


def test_index_query_and_reindex_through_the_cli(tmp_path, pixel_model_dir, ray_cluster, capsys):
    data, store = tmp_path / "data", tmp_path / "store"
    generate_world("paper", str(data), num_images=8, image_size=16, shard_size=4, seed=1)
    common = [
        f"job.data={data}",
        f"job.store={store}",
        f"job.model={pixel_model_dir}",
        *SETTINGS,
        "--no-progress",
    ]
    query = [
        "query",
        *common,
        "--prompt",
        "a red triangle",
        "--concept",
        "triangle",
        "--scope",
        "global",
        "--top-k",
        "3",
        "attribution.query.num_draws=1",
        "attribution.query.sample_steps=2",
    ]
    assert main(["featurize", *common]) == 0
    # 1. no index yet: a named error
    assert main([*query, "--index"]) == 2
    assert "IndexNotFoundError" in capsys.readouterr().err
    # 2. build it; the index query returns the exact scan's hits and scores
    built = tmp_path / "index.json"
    assert main(["index", *common, "--codes", "flat", "--json", str(built)]) == 0
    assert "IVF1,Flat over 8 rows in 1 index shard(s)" in capsys.readouterr().out
    exact, indexed = tmp_path / "exact.json", tmp_path / "indexed.json"
    assert main([*query, "--json", str(exact)]) == 0
    assert main([*query, "--index", "--json", str(indexed)]) == 0
    assert _hits(indexed) == _hits(exact) and len(_hits(exact)[0]) == 3
    assert json.loads(indexed.read_text())["index"]["factory"] == "IVF1,Flat"
    # 3. a new data shard, featurized by reindex, goes into the index as a new index shard
    generate_world("paper", str(tmp_path / "more"), num_images=4, image_size=16, seed=9)
    (tmp_path / "more" / "00000.tar").rename(data / "00002.tar")
    assert main(["featurize", *common]) == 0  # the store now has a shard the index lacks
    capsys.readouterr()
    assert main([*query, "--index"]) == 2
    assert "StaleIndexError" in capsys.readouterr().err
    assert main(["reindex", *common]) == 0
    assert "index: 1 feature shard(s) added; 12 rows in 2 index shard(s)" in capsys.readouterr().out
    assert main([*query, "--json", str(exact)]) == 0
    assert main([*query, "--index", "--json", str(indexed)]) == 0
    assert _hits(indexed) == _hits(exact)
