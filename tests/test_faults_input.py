"""Bad input explains itself and loses nothing, through `jobs.cli.main` on a local store:

4. corrupt input (truncated tar, garbage tar, undecodable image, missing caption, wrong size,
   wrong mode, duplicate key, a shard that is entirely bad): every bad row is recorded
   (shard, key, reason) in the rejects table, the summary prints the count, good rows are
   featurized, and the job passes within its error budget;
5. numerics: a NaN gradient (CTRAK_FAULT=nan:key=...) or a zero-norm timestep is a rejected
   row with its reason - never a feature, never in the Gram;
6. store integrity: a truncated or altered feature shard is a StoreCorruptError at query time
   naming the shard and the fix (which works); a store from another model or method is
   refused;
7. bad queries: a named error, exit code 2, no JSON written, the store unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig
from ctrak.kernel import gram
from ctrak.toy.world_shards import generate_world, read_samples
from jobs.cli import main
from pipeline.feature_file import table_features
from pipeline.featurize import REJECT_NUMERICS, Featurizer, describe_model
from pipeline.fisher import current_kernel
from pipeline.ingest import ShardAssembler, split_records
from pipeline.store import FeatureStore

ATTRIBUTION = AttributionConfig(
    gradient=GradientConfig(timesteps=(499, 899)), projection=ProjectionConfig(k=32)
)
SETTINGS = [
    "attribution.projection.k=32",
    "attribution.gradient.timesteps=[499, 899]",
    "job.batch_size=4",
    "--no-progress",
]
POISONED = "000000001"  # its pixels become NaN inside the featurize actor


def _png(image: np.ndarray | None = None, size: int = 16, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(image) if image is not None else Image.new(mode, (size, size), 90)
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _sample(key: str, row: dict) -> list[tuple[str, bytes]]:
    meta = json.dumps({"key": key, **row["labels"]}).encode()
    image, text = _png(row["image"]), row["caption"].encode()
    return [(f"{key}.png", image), (f"{key}.txt", text), (f"{key}.json", meta)]


# rejects each shard must record: shard -> [(row, key, reason prefix)]
EXPECTED_REJECTS = {
    "00000": [
        (1, POISONED, REJECT_NUMERICS),
        (2, "000000002", "undecodable image"),
        (3, "000000003", "missing caption (.txt member)"),
        (4, "000000004", "image is 24x24, the model takes 16x16"),
        (5, "000000005", "image mode is L, expected RGB"),
        (6, "000000000", "duplicate key"),
    ],
    "00001": [(2, "000010002", "truncated tar")],
    "00002": [(0, "", "unreadable tar")],
    "00003": [(0, "000030000", "image is 8x8"), (1, "000030001", "image is 8x8")],
}
GOOD = ["000000000", "000000007", "000010000", "000010001"]


@pytest.fixture(scope="module")
def world_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input-world") / "paper"
    generate_world("paper", str(folder), num_images=6, image_size=16, shard_size=6, seed=3)
    return list(read_samples(str(folder)))


@pytest.fixture(scope="module")
def bad_data(world_rows, tmp_path_factory):
    """Four shards: mixed problems, a truncated tar, a garbage tar, an entirely bad shard."""
    rows = world_rows
    folder = tmp_path_factory.mktemp("input-data")
    mixed = [
        *_sample("000000000", rows[0]),
        *_sample(POISONED, rows[1]),
        ("000000002.jpg", b"not an image"),
        ("000000002.txt", b"a broken file"),
        ("000000003.png", _png(rows[2]["image"])),  # no caption
        ("000000004.png", _png(size=24)),
        ("000000004.txt", b"too big"),
        ("000000005.png", _png(mode="L")),
        ("000000005.txt", b"grey"),
        ("000000000.png", _png(rows[3]["image"])),  # the same key again, later
        ("000000000.txt", b"a duplicate"),
        *_sample("000000007", rows[4]),
    ]
    (folder / "00000.tar").write_bytes(_tar_bytes(mixed))
    whole = _tar_bytes(
        [
            *_sample("000010000", rows[5]),
            *_sample("000010001", rows[0]),
            *_sample("000010002", rows[1]),
        ]
    )
    cut = whole.index(b"000010002.png") + 700  # inside the third sample's image
    (folder / "00001.tar").write_bytes(whole[:cut])
    (folder / "00002.tar").write_bytes(b"\x89garbage, not a tar" * 40)
    bad = [(f"00003000{i}.png", _png(size=8)) for i in range(2)]
    (folder / "00003.tar").write_bytes(
        _tar_bytes([m for i, b in enumerate(bad) for m in (b, (f"00003000{i}.txt", b"small"))])
    )
    return folder


@pytest.fixture(scope="module")
def featurized(bad_data, pixel_model_dir, ray_cluster, tmp_path_factory):
    """`ctrak featurize` over the bad data with a 80% error budget (and a NaN row):
    (store path, CLI args, exit code, printed output, JSON summary)."""
    folder = tmp_path_factory.mktemp("input-store")
    store, summary = folder / "store", folder / "summary.json"
    args = [
        f"job.data={bad_data}",
        f"job.store={store}",
        f"job.model={pixel_model_dir}",
        *SETTINGS,
    ]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setenv("CTRAK_FAULT", f"nan:key={POISONED}")
        code = main(["featurize", *args, "job.max_reject_fraction=0.8", "--json", str(summary)])
    return store, args, code, out.getvalue(), json.loads(summary.read_text())


def _listing(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---- 4. corrupt input, 5. numerics (through the pipeline) --------------------------------------
def test_bad_rows_are_recorded_and_good_rows_featurized(featurized):
    store_path, _, code, printed, summary = featurized
    assert code == 0
    assert (summary["written"], summary["rows"], summary["rejected"]) == (4, 4, 10)
    assert "4 rows featurized, 10 rejected" in printed and "rejects/" in printed
    assert summary["reasons"][REJECT_NUMERICS] == 1 and summary["reasons"]["duplicate key"] == 1
    store = FeatureStore(str(store_path))
    entries = store.entries()
    assert sorted(entries) == ["00000", "00001", "00002", "00003"]  # bad shards are finished
    keys = []
    for shard, entry in sorted(entries.items()):
        rejects = store.read_rejects(entry).to_pylist()
        assert [r["shard"] for r in rejects] == [shard] * len(rejects)
        got = [(r["row"], r["key"], r["reason"]) for r in rejects]
        assert len(got) == len(EXPECTED_REJECTS[shard]) == entry.rejects
        for (row, key, reason), (want_row, want_key, prefix) in zip(
            got, EXPECTED_REJECTS[shard], strict=True
        ):
            assert (row, key) == (want_row, want_key) and reason.startswith(prefix), reason
        table = store.read_features(entry)
        phi = table_features(table)
        assert np.isfinite(phi).all() and entry.rows == table.num_rows
        # the shard's Gram is exactly that of its stored rows: no rejected row in the Fisher
        np.testing.assert_array_equal(store.load_gram(entry), gram(torch.from_numpy(phi)).numpy())
        keys += table.column("key").to_pylist()
    assert keys == GOOD  # each good row exactly once; the NaN row is not a feature
    kernel, info = current_kernel(store, 1.0)
    assert info["rows"] == 4 and torch.isfinite(kernel.chol).all()


def test_the_error_budget_fails_a_rerun_without_redoing_work(featurized, capsys):
    store_path, args, *_ = featurized
    before = _listing(store_path)
    assert main(["reindex", *args]) == 2  # the default budget (1%) is exceeded
    out, err = capsys.readouterr()
    assert "RejectBudgetError: 10 of 14 rows" in err and "0 shard(s) written" in out
    assert _listing(store_path) == before


def test_featurizer_rejects_nonfinite_and_zero_norm_rows(world_rows, pixel_model_dir, monkeypatch):
    """The actor stage in this process: a NaN row and a zero-norm timestep become rejects
    with zero features; the other rows are unchanged."""
    provenance = describe_model(str(pixel_model_dir), ATTRIBUTION)["provenance"]
    featurizer = Featurizer(str(pixel_model_dir), ATTRIBUTION, provenance)
    images = np.stack([r["image"] for r in world_rows[:4]] + [np.zeros((16, 16, 3), np.uint8)])
    batch = {
        "shard": np.array(["s"] * 5, object),
        "row": np.array([0, 1, 2, 3, -1]),
        "key": np.array(["a", "b", "c", "d", ""], object),
        "caption": np.array([r["caption"] for r in world_rows[:4]] + [""], object),
        "metadata": np.array([""] * 5, object),
        "reason": np.array(["", "", "", "missing caption (.txt member)", ""], object),
        "count": np.array([0, 0, 0, 0, 4]),
        "image": images,
    }
    clean = featurizer(batch)
    assert list(clean["reason"][:3]) == ["", "", ""]
    monkeypatch.setenv("CTRAK_FAULT", "nan:key=b")  # row b: NaN pixels -> NaN gradient
    attributor = featurizer.attributor
    timestep_gradient = attributor._timestep_gradient

    def zero_third_row(loss, inputs, *rest):  # row c: a zero gradient at every timestep
        g, sq = timestep_gradient(loss, inputs, *rest)
        g, sq = g.clone(), None if sq is None else sq.clone()
        g[2] = 0
        if sq is not None:
            sq[2] = 0
        return g, sq

    monkeypatch.setattr(attributor, "_timestep_gradient", zero_third_row)
    out = featurizer(batch)
    assert list(out["reason"]) == [
        "",
        REJECT_NUMERICS,
        REJECT_NUMERICS,
        "missing caption (.txt member)",
        "",
    ]
    assert not out["feature"][1:].any()
    np.testing.assert_allclose(out["feature"][0], clean["feature"][0], rtol=1e-5, atol=1e-6)
    ((_, records),) = ShardAssembler().add(out)
    columns, features, rejects = split_records(records, k=32)
    assert columns["key"] == ["a"] and features.shape == (1, 32)
    assert [(r["key"], r["reason"]) for r in rejects] == [
        ("b", REJECT_NUMERICS),
        ("c", REJECT_NUMERICS),
        ("d", "missing caption (.txt member)"),
    ]


# ---- 6. store integrity ---------------------------------------------------------------------
@pytest.fixture
def query_args(featurized, world_rows, tmp_path):
    """A copy of the featurized store and the arguments of a valid query on it."""
    store_path, args, *_ = featurized
    copy = tmp_path / "store"
    shutil.copytree(store_path, copy)
    image = tmp_path / "query.png"
    image.write_bytes(_png(world_rows[0]["image"]))
    row = world_rows[0]
    common = [a if not a.startswith("job.store=") else f"job.store={copy}" for a in args]
    query = ["--prompt", row["caption"], "--concept", row["labels"]["shape"], "--image", str(image)]
    return copy, common, query


def test_truncated_or_altered_feature_shard_is_refused_at_query_time(query_args, tmp_path, capsys):
    store, common, query = query_args
    out = tmp_path / "hits.json"
    features = store / "features" / "00001.parquet"
    data = features.read_bytes()
    for broken in (data[: len(data) // 2], data[:100] + bytes([data[100] ^ 1]) + data[101:]):
        features.write_bytes(broken)
        assert main(["query", *common, *query, "--json", str(out)]) == 2
        err = capsys.readouterr().err
        assert "StoreCorruptError: shard 00001" in err and "features/00001.parquet" in err
        assert "done/00001.json" in err and "ctrak reindex" in err
        assert not out.exists()
    # the fix the message gives: delete the marker, reindex; then the query answers
    (store / "done" / "00001.json").unlink()
    assert main(["reindex", *common, "job.max_reject_fraction=0.8"]) == 0
    assert "1 shard(s) written" in capsys.readouterr().out
    assert main(["query", *common, *query, "--top-k", "3", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["results"][0]["hits"]) == 3


def test_a_store_from_another_model_or_method_is_refused(
    query_args, tmp_path_factory, tmp_path, capsys
):
    from ctrak.toy.tiny import build_tiny_model

    store, common, query = query_args
    before = _listing(store)
    out = tmp_path / "hits.json"
    trak = [*common, 'attribution.gradient.method="trak"']
    assert main(["query", *trak, *query, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ProvenanceMismatchError" in err and "attribution.gradient.method" in err
    other = build_tiny_model(tmp_path_factory.mktemp("other") / "model", latent=False, seed=5)
    assert main(["reindex", *common, f"job.model={other}"]) == 2
    err = capsys.readouterr().err
    assert "ProvenanceMismatchError" in err and "model: store" in err
    assert _listing(store) == before and not out.exists()


# ---- 7. bad queries -------------------------------------------------------------------------
def test_bad_queries_fail_with_a_named_error_and_write_nothing(query_args, tmp_path, capsys):
    store, common, query = query_args
    before = _listing(store)
    out = tmp_path / "hits.json"
    image = query[query.index("--image") + 1]
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    missing_store = tmp_path / "no-store"
    cases = {
        "ConceptNotInPromptError": ["--prompt", "a red circle", "--concept", "square"],
        "PromptError": ["--prompt", "", "--image", image],
        "ImageShapeError": ["--prompt", "a red circle", "--image", str(unreadable)],
        "ConfigError: top_k=0": [*query, "--top-k", "0"],
        "ConfigError: top_k=-2": [*query, "--top-k", "-2"],
        "StoreNotFoundError": [*query, f"job.store={missing_store}"],
        # the token check (ctrak/tokens.py), on every query: a word the tokenizer maps to
        # [UNK], a prompt past the encoder's 8 tokens, a negative that tokenises the same
        "UnknownWordError: the prompt 'a red pikachu'": [
            *["--prompt", "a red pikachu", "--concept", "pikachu", "--image", image]
        ],
        "PromptTruncatedError: the prompt": [
            *["--prompt", "a red triangle in the style of a drawing", "--concept", "drawing"],
            *["--image", image],
        ],
        "SameAsNegativeError": [
            *["--prompt", "a red triangle", "--negative", "a  red triangle", "--image", image]
        ],
    }
    for name, extra in cases.items():
        args = ["query", *common, *extra, "--json", str(out)]
        if name.startswith("ConceptNotInPrompt"):
            args += ["--image", image]
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert f"error: {name}" in err, err
        assert not out.exists() and not missing_store.exists()
    assert _listing(store) == before
