"""The counterfactual check at CI size: a tiny 8 px paper world (24 images), a 6-step toy
model, one removal size, two rankings (Concept-TRAK and random). Asserts what holds at any
size - the removed images are exactly each ranking's top m and absent from what the retrain
read, a retrain without removal reproduces the base weights bit for bit, presence rates and
their intervals are consistent - not whether the removal lowered the concept (the full
measurement, docs/counterfactual.md)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from ctrak.config import ProjectionConfig
from ctrak.errors import ConceptNotLearnedError, ConfigError
from ctrak.toy.train import train
from ctrak.toy.world_shards import generate_world, read_samples
from jobs.cli import build_parser
from pipeline.evaluation.counterfactual import (
    ranking,
    removal_id,
    retrain_args,
    wilson,
    write_subset,
)
from pipeline.evaluation.counterfactual_run import Plan, measure
from pipeline.evaluation.counterfactual_table import claims, markdown, pooled
from pipeline.evaluation.synthetic_bench import Variant, method_variants

UNET = ("unet", "diffusion_pytorch_model.safetensors")


def _train_args(data, out, *extra):
    recipe = "--channels 8,16 --text-dim 16 --batch-size 8 --steps 6 --warmup 2 "
    recipe += "--attribute-dropout 0.3 --eval-per-combo 0 --threads 1 --vocabulary builtin"
    argv = ["train-toy", "--data", str(data), "--out", str(out), *recipe.split(), *extra]
    return build_parser().parse_args(argv)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("cf")
    generate_world("paper", str(root / "data"), num_images=24, image_size=8, seed=0)
    train(_train_args(root / "data", root / "base"))
    (ct,) = method_variants(["concept-trak"], timesteps=(499,))
    ct = Variant(ct.name, replace(ct.config, projection=ProjectionConfig(k=32)))
    plan = Plan(
        run=root / "base",
        prompt="a red triangle",
        targets=("red",),
        variants=(ct,),
        sizes=(4,),
        seeds=(0, 1),
        removal_seeds=2,  # every removal retrains at both seeds: paired, pooled drops
        min_concept_rate=0.0,  # a 6-step model draws nothing right (the refusal: below)
        draws=16,
        sample_steps=4,
        rank_draws=2,
        oracle=True,
        work=root / "work",
    )
    updates = []
    result = measure(plan, log=lambda line: None, on_update=updates.append)
    return root, plan, result, updates


def test_removed_images_are_the_rankings_top_m_and_absent_from_the_retrain(measured):
    root, plan, result, _ = measured
    all_keys = [r["key"] for r in read_samples(str(root / "data"))]
    scores = json.loads((plan.work / "rankings" / "concept-trak-red.json").read_text())
    assert scores["keys"] == all_keys
    top = {all_keys[i] for i in ranking(torch.tensor(scores["scores"]).numpy())[:4]}
    by_ranking = {r["ranking"]: r for r in result["records"]}
    assert set(by_ranking) == {"none", "concept-trak", "random", "labels"}
    assert sorted((r["ranking"], r["seed"]) for r in result["records"]) == sorted(
        (name, seed) for name in by_ranking for seed in (0, 1)
    )
    for name, record in by_ranking.items():
        folder = plan.work / "retrains" / record["retrain"]
        removed = set(json.loads((folder / "result.json").read_text())["removed"])
        assert len(removed) == record["m"] == (0 if name == "none" else 4)
        if name == "labels":  # the oracle control removes only red images (8 of 24 are)
            assert record["removed_with_target"] == 4 == record["removed_by_combo"]["red circle"]
        if name == "concept-trak":
            assert removed == top
        trained = [r["key"] for r in read_samples(str(folder / "data"))]
        assert set(trained) == set(all_keys) - removed and len(trained) == 24 - len(removed)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["num_train_images"] == 24 - len(removed) and summary["steps"] == 6
    assert by_ranking["random"]["removed_by_combo"] != {}  # 4 images, counted by combination


def test_retrain_without_removal_reproduces_the_base_weights(measured):
    root, plan, result, _ = measured
    (none,) = [r for r in result["records"] if r["ranking"] == "none" and r["seed"] == 0]
    base = load_file(root.joinpath("base", "model", *UNET))
    again = load_file(plan.work.joinpath("retrains", none["retrain"], "train", "model", *UNET))
    assert base.keys() == again.keys()
    assert all(torch.equal(base[k], again[k]) for k in base)
    removed = next(r for r in result["records"] if r["ranking"] == "concept-trak")
    assert removed["unet_sha256"] != none["unet_sha256"]  # fewer images: other weights


def test_presence_rates_intervals_and_table(measured):
    _, plan, result, updates = measured
    assert len(updates) == len(result["records"]) == 8  # one partial result per retrain
    for record in result["records"]:
        for attr in ("shape", "colour", "both"):
            p = record["presence"][attr]
            assert p["n"] == plan.draws and p["rate"] == p["k"] / p["n"]
            assert 0 <= p["lo"] <= p["rate"] <= p["hi"] <= 1
        assert sum(record["presence"]["labels"].values()) == plan.draws
    table = markdown(result)
    assert "| none (seed 0) | 0 | - |" in table
    assert "Target 'red' (colour); the other attribute is the shape." in table
    assert (
        sum(
            line.startswith(("| concept-trak | 4 ", "| random | 4 ")) for line in table.splitlines()
        )
        == 2
    )
    (check,) = claims(result)
    assert check["target"] == "red" and check["m"] == 4 and check["compared_with"] == ["random"]
    assert check["seeds"] == [0, 1]


def test_removal_seeds_pool_the_draws_and_pair_the_drop(measured):
    _, _, result, _ = measured
    rows = {(r["ranking"], r["seed"]): r["presence"]["colour"] for r in result["records"]}
    k = {name: rows[(name, 0)]["k"] + rows[(name, 1)]["k"] for name in ("none", "concept-trak")}
    ct = pooled([r for r in result["records"] if r["ranking"] == "concept-trak"], "colour")
    assert (ct["k"], ct["n"]) == (k["concept-trak"], 32)
    assert (ct["lo"], ct["hi"]) == wilson(k["concept-trak"], 32)
    line = next(x for x in markdown(result).splitlines() if x.startswith("| concept-trak | 4 "))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    drop = (k["none"] - k["concept-trak"]) / 32  # baseline and removal over the same seeds
    assert cells[5] == f"{drop:+.2f}"
    per_seed = (
        f"(s0 {rows[('concept-trak', 0)]['rate']:.2f}, s1 {rows[('concept-trak', 1)]['rate']:.2f})"
    )
    assert cells[4].endswith(per_seed)


def test_an_unlearned_target_is_refused_before_any_work(measured, tmp_path):
    _, plan, _, _ = measured
    strict = replace(plan, min_concept_rate=0.8, work=tmp_path / "work")
    with pytest.raises(ConceptNotLearnedError, match="colour='red'"):
        measure(strict, log=lambda line: None)
    assert not (tmp_path / "work" / "rankings").exists()  # refused before ranking
    with pytest.raises(ConfigError, match="removal_seeds=3"):
        measure(replace(plan, removal_seeds=3), log=lambda line: None)


def test_rerun_resumes_from_the_cache(measured):
    _, plan, result, _ = measured
    again = measure(plan, log=lambda line: None)  # every retrain cached: no training
    assert again["records"] == result["records"]
    # --cached-only with a size never trained: that size's retrains are left out, not run
    partial = measure(replace(plan, sizes=(4, 2), cached_only=True), log=lambda line: None)
    assert partial["records"] == result["records"]


def test_wilson_interval_matches_the_textbook_values():
    # Wilson (1927) 95% intervals: 0/10 -> [0, 0.2775], 5/10 -> [0.2366, 0.7634]
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    with pytest.raises(ConfigError, match="0 <= k <= n"):
        wilson(11, 10)


def test_bad_removals_and_finetuned_runs_are_refused(tmp_path, measured):
    root, *_ = measured
    with pytest.raises(ConfigError, match="not in"):
        write_subset(str(root / "data"), tmp_path / "sub", ["999999999"])
    config = json.loads((root / "base" / "train_config.json").read_text())
    with pytest.raises(ConfigError, match="from scratch"):
        retrain_args({**config, "init": "some/model"}, tmp_path, tmp_path / "o", 0)
    with pytest.raises(ConfigError, match="--vocabulary builtin"):
        retrain_args({**config, "vocabulary": "captions"}, tmp_path, tmp_path / "o", 0)
    assert removal_id(["b", "a"], 0) == removal_id(["a", "b"], 0) != removal_id(["a"], 0)
