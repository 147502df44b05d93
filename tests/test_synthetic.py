"""Synthetic worlds (ctrak/toy/worlds.py) and the toy trainer (ctrak/toy/train.py,
`ctrak train-toy`)."""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctrak.errors import ConfigError
from ctrak.toy.tiny import DEFAULT_WORDS
from ctrak.toy.world_shards import generate_world, read_samples
from ctrak.toy.worlds import (
    PALETTE,
    WORLDS,
    classify,
    render,
    sample_row,
    split_combos,
    world_combos,
)


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_generation_is_deterministic(tmp_path):
    kwargs = dict(num_images=12, image_size=24, shard_size=5, seed=3)
    generate_world("paper", str(tmp_path / "a"), **kwargs)
    generate_world("paper", str(tmp_path / "b"), **kwargs)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 1 + 3 * 3
    assert all(a[name] == b[name] for name in a), "same seed must give the same bytes"
    generate_world("paper", str(tmp_path / "c"), **{**kwargs, "seed": 4})
    assert _files(tmp_path / "c")["00000.tar"] != a["00000.tar"]


def test_img2dataset_layout(tmp_path):
    uris = generate_world("paper", str(tmp_path), num_images=7, image_size=20, shard_size=4)
    assert uris == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    for shard, count in ((0, 4), (1, 3)):
        with tarfile.open(tmp_path / f"{shard:05d}.tar") as tar:
            names = tar.getnames()
            assert len(names) == 3 * count
            keys = sorted({n.rsplit(".", 1)[0] for n in names})
            assert keys == [f"{shard:05d}{j:04d}" for j in range(count)]
            assert all(re.fullmatch(r"\d{9}\.(png|txt|json)", n) for n in names)
            meta = json.loads(tar.extractfile(f"{keys[0]}.json").read())
            text = tar.extractfile(f"{keys[0]}.txt").read().decode()
        assert text == f"a {meta['colour']} {meta['shape']}" and meta["heldout"] is False
        table = pq.read_table(tmp_path / f"{shard:05d}.parquet").to_pylist()
        assert [row["key"] for row in table] == keys
        row = table[0]
        assert row["status"] == "success" and row["error_message"] is None
        assert (row["width"], row["height"], row["caption"]) == (20, 20, text)
        assert json.loads(row["json"]) == meta
        stats = json.loads((tmp_path / f"{shard:05d}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == count
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["world"] == "paper" and spec["num_images"] == 7


def test_rerun_skips_and_mismatch_raises(tmp_path):
    generate_world("paper", str(tmp_path), num_images=4, image_size=16, shard_size=2)
    (tmp_path / "00001.tar").write_bytes(b"marker")  # a finished shard is not rewritten
    generate_world("paper", str(tmp_path), num_images=4, image_size=16, shard_size=2)
    assert (tmp_path / "00001.tar").read_bytes() == b"marker"
    with pytest.raises(ConfigError, match="already holds"):
        generate_world("paper", str(tmp_path), num_images=4, image_size=24, shard_size=2)


def test_fsspec_uri_roundtrip():
    uri = "memory://ctrak-test-synthetic"
    generate_world("paper", uri, num_images=5, image_size=16, shard_size=3)
    rows = list(read_samples(uri))
    keys = ["000000000", "000000001", "000000002", "000010000", "000010001"]
    assert [r["key"] for r in rows] == keys
    assert rows[0]["image"].shape == (16, 16, 3)


@pytest.mark.parametrize("world", ["paper", "wide"])
def test_training_excludes_heldout_and_is_balanced(tmp_path, world):
    combos = world_combos(world)
    heldout = {(c.shape, c.colour) for c in combos if c.heldout}
    if world == "paper":
        assert heldout == {("triangle", "red")}
    else:
        assert len(heldout) >= 3 and len(WORLDS[world]["shapes"]) >= 4
    train = split_combos(world, "train")
    assert {c.shape for c in train} == set(WORLDS[world]["shapes"])
    assert {c.colour for c in train} == set(WORLDS[world]["colours"])
    assert all(word in DEFAULT_WORDS for c in combos for word in c.caption.split())
    n = 6 * len(train)
    generate_world(world, str(tmp_path), num_images=n, image_size=24, shard_size=10)
    counts = Counter()
    for row in read_samples(str(tmp_path)):
        label = (row["labels"]["shape"], row["labels"]["colour"])
        assert label not in heldout and not row["labels"]["heldout"]
        counts[label] += 1
    assert set(counts.values()) == {6} and len(counts) == len(train)


@pytest.mark.parametrize("world", ["paper", "wide"])
def test_labels_match_pixels(world):
    palette = np.array([PALETTE[c] for c in PALETTE], dtype=np.float32)  # (K, 3)
    for index in range(24):
        image, labels = sample_row(world, "all", index, 24, seed=7)
        pixels = image.reshape(-1, 3).astype(np.float32)
        pixels = pixels[(pixels.max(1) - pixels.min(1)) > 60]  # coloured, not white/outline
        nearest = np.argmin(((pixels[:, None] - palette[None]) ** 2).sum(-1), axis=1)
        dominant = list(PALETTE)[np.bincount(nearest, minlength=len(PALETTE)).argmax()]
        assert dominant == labels["colour"]
        assert len(pixels) > 0.04 * 24 * 24  # the shape is big enough to read
        assert classify(image, world) == (labels["shape"], labels["colour"])


def test_render_shapes_differ_and_blank_is_unclassified():
    masks = {
        s: render(s, "blue", (16, 16), 9, 32).min(axis=2) < 250 for s in WORLDS["wide"]["shapes"]
    }
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert (masks[a] != masks[b]).sum() > 20, (a, b)
    assert classify(np.full((24, 24, 3), 255, np.uint8), "paper") == (None, None)


def test_train_toy_tiny_run(tmp_path):
    from ctrak.model import DiffusionModel
    from jobs.cli import main

    data, out = tmp_path / "data", tmp_path / "run"
    generate_world("paper", str(data), num_images=24, image_size=16, shard_size=100)
    argv = [
        "train-toy",
        *("--data", str(data), "--out", str(out), "--channels", "8,16", "--text-dim", "16"),
        *("--steps", "40", "--batch-size", "12", "--lr", "3e-3", "--warmup", "5"),
        *("--log-every", "1", "--threads", "1", "--eval-per-combo", "1", "--sample-steps", "2"),
        *("--check-per-combo", "2"),
        *("--grid", str(tmp_path / "grid.png"), "--json", str(tmp_path / "summary.json")),
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["world"] == "paper"
    losses = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in losses if "loss" in r]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    model = DiffusionModel.load(out / "model")
    assert model.image_size == 16 and model.vae is None
    assert model.prediction_type == "v_prediction"  # the default target (see train_toy doc)
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert set(summary["samples"]) == {c.caption for c in world_combos("paper")}
    check = json.loads((out / "model" / "concept_check.json").read_text())  # a built-in world:
    assert check["classifier"]["classifier"].startswith("ctrak.toy.worlds.classify")
    assert check["attributes"]["colour"]["red"]["heldout_draws"] == 2  # the red triangle
    assert summary["concept_check"] == check


def test_attribute_dropout_spells_the_query_negatives():
    from ctrak.attribution import resolve_negative
    from ctrak.toy.train import _attribute_drops, _drop_attributes

    assert (
        _attribute_drops("a red triangle")
        == [
            resolve_negative("a red triangle", "red", None),
            resolve_negative("a red triangle", "triangle", None),
        ]
        == ["a triangle", "a red"]
    )
    assert _attribute_drops("") == []  # the null prompt stays null
    texts = ["a blue circle"] * 2000 + [""]
    out = _drop_attributes(texts, 0.3, seed=0, step=7)
    assert out == _drop_attributes(texts, 0.3, seed=0, step=7)  # deterministic per step
    assert out != _drop_attributes(texts, 0.3, seed=0, step=8)
    counts = Counter(out)
    assert set(counts) == {"a blue circle", "a circle", "a blue", ""}
    assert counts[""] == 1
    assert 0.25 < (counts["a circle"] + counts["a blue"]) / 2000 < 0.35
    assert abs(counts["a circle"] - counts["a blue"]) < 100


def test_train_toy_fine_tunes_from_init(tmp_path):
    import torch

    from ctrak.model import DiffusionModel
    from jobs.cli import main

    data = tmp_path / "data"
    generate_world("paper", str(data), num_images=12, image_size=16, shard_size=100)
    common = ["--data", str(data), "--channels", "8,16", "--text-dim", "16", "--threads", "1"]
    common += ["--batch-size", "6", "--eval-per-combo", "0", "--check-per-combo", "0"]
    assert main(["train-toy", *common, "--out", str(tmp_path / "a"), "--steps", "3"]) == 0
    init = DiffusionModel.load(tmp_path / "a" / "model")
    argv = ["train-toy", *common, "--out", str(tmp_path / "b"), "--steps", "2", "--lr", "1e-2"]
    argv += ["--init", str(tmp_path / "a" / "model"), "--attribute-dropout", "0.5", "--seed", "1"]
    assert main(argv) == 0
    tuned = DiffusionModel.load(tmp_path / "b" / "model")
    a = dict(init.unet.named_parameters())
    b = dict(tuned.unet.named_parameters())
    assert a.keys() == b.keys()
    delta = max(float((a[n] - b[n]).abs().max()) for n in a)
    # started from the init weights (another seed's fresh init differs by far more), then moved
    assert 0 < delta < 0.05
    for n, p in init.text_encoder.named_parameters():  # the frozen encoder is carried over
        assert torch.equal(p, dict(tuned.text_encoder.named_parameters())[n])
