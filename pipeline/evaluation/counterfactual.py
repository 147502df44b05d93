"""The counterfactual check: remove a ranking's top-m training images, retrain, and measure
whether the model still draws the target concept in the held-out combination.

P@10 by label says the ranked images *look* like the concept; this asks whether they *caused*
it (the paper's target is the model's concept presence p_theta(c)). For one prompt (a held-out
combination) and a target concept:

1. rank the training set with each method (global scope: the base model's own draws of the
   prompt, at the query's guidance) and with a random permutation;
2. remove each ranking's top m (several m) and retrain the toy model from scratch with the
   base run's exact recipe and seed on what is left (`ctrak.toy.train.train`);
3. draw the prompt many times from each retrained model and classify every draw
   (`ctrak.toy.worlds.classify`): the target attribute's presence = the share of draws whose
   target attribute reads right, with a Wilson 95% interval over draws; the same for the
   prompt's other attribute, which a concept-level removal should leave alone.

Every retrain is cached under <work>/retrains/<id>/ (its `result.json` written last), keyed
by the removed keys and the seed, so an interrupted run resumes and two rankings that remove
the same images (the whole-image baselines ignore the concept) share one retrain: the plan
and the run order are `pipeline.evaluation.counterfactual_run`, the table
`pipeline.evaluation.counterfactual_table`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ctrak.errors import ConfigError
from pipeline.evaluation.counterfactual_table import rate, wilson  # noqa: F401 (re-exported)
from pipeline.evaluation.synthetic_bench import Variant

RANDOM = "random"
ORACLE = "labels"  # the control that knows the answer: every image with the target first
ATTRIBUTES = ("shape", "colour")
# keys of a train-toy run's train_config.json that are records, not trainer arguments
_RECORD_KEYS = ("data_spec", "num_train_images", "image_size")


# ---- the training set and its rankings -----------------------------------------------------
def load_training_set(data: str) -> tuple[torch.Tensor, list[str], list[str], list[dict]]:
    """The shards a run trained on -> (images (N, 3, H, W) in [-1, 1], captions, keys,
    labels), in `read_samples`' key order (the trainer's row order)."""
    from ctrak.toy.world_shards import read_samples

    rows = list(read_samples(data))
    images = torch.from_numpy(np.stack([r["image"] for r in rows])).permute(0, 3, 1, 2)
    return (
        images.float() / 127.5 - 1.0,
        [r["caption"] for r in rows],
        [r["key"] for r in rows],
        [r["labels"] for r in rows],
    )


def method_scores(
    model,
    variant: Variant,
    images: torch.Tensor,
    captions: list[str],
    prompt: str,
    concept: str,
    *,
    draws: int,
    guidance: float,
    cache: Path,
) -> np.ndarray:
    """Influence of every training image on (prompt, concept), global scope: the variant's
    features (cached as in `ctrak eval`), its damped kernel, the query gradient averaged over
    `draws` of the model at `guidance`. Returns (N,) float64 scores (higher = more influence)."""
    from ctrak.attribution import Attributor, Query
    from ctrak.kernel import scores
    from pipeline.evaluation.synthetic_bench import _features

    attributor = Attributor(model, variant.config)
    features, _ = _features(attributor, images, captions, cache)
    kernel = attributor.fit(features)
    query_cfg = replace(
        variant.config.query, scope="global", num_draws=draws, sample_guidance=guidance
    )
    x = attributor.solved_query(Query(prompt, concept=concept), kernel, query_cfg)[None]
    return scores(features, x)[0].double().numpy()


def ranking(scores: np.ndarray) -> np.ndarray:
    """(N,) scores -> row indices, highest score first (ties: lower row first)."""
    return np.argsort(-scores, kind="stable")


def random_ranking(n: int, seed: int) -> np.ndarray:
    """A seeded uniform permutation of range(n): the random-removal control."""
    from ctrak.seeds import generator

    return torch.randperm(n, generator=generator(seed, "counterfactual-random")).numpy()


def label_ranking(labels: list[dict], attribute: str, value: str, seed: int) -> np.ndarray:
    """The oracle control: the rows whose label has `attribute` == `value` first, then the
    rest, each group in a seeded random order. Its top-m removal is the most a ranking can
    take from the concept, so it shows whether the world can register a removal at all."""
    perm = random_ranking(len(labels), seed)
    carries = np.array([labels[i][attribute] == value for i in perm])
    return np.concatenate([perm[carries], perm[~carries]])


# ---- removal and retraining ----------------------------------------------------------------
def removal_id(removed: Sequence[str], seed: int) -> str:
    """A retrain's cache id: the removed keys (as a set) and the training seed."""
    text = json.dumps([sorted(removed), int(seed)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_subset(data: str, out: Path, removed: Sequence[str]) -> Path:
    """Copy the tar shards under `data` to `out` without the samples whose key is in `removed`
    (every member of a kept sample byte for byte); spec.json gains the removed keys."""
    import fsspec

    removed_set = set(removed)
    fs, root = fsspec.core.url_to_fs(data)
    paths = sorted(fs.glob(f"{root.rstrip('/')}/*.tar"))
    seen = set()
    out.mkdir(parents=True, exist_ok=True)
    for path in paths:
        buffer = io.BytesIO()
        with (
            fs.open(path, "rb") as handle,
            tarfile.open(fileobj=handle, mode="r:") as src,
            tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as dst,
        ):
            for member in src.getmembers():
                key = member.name.rpartition(".")[0]
                if key in removed_set:
                    seen.add(key)
                    continue
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        (out / Path(path).name).write_bytes(buffer.getvalue())
    missing = removed_set - seen
    if missing:
        raise ConfigError(f"removal names keys that are not in {data}: {sorted(missing)[:5]}")
    spec_path = f"{root.rstrip('/')}/spec.json"
    spec = json.loads(fs.cat_file(spec_path)) if fs.exists(spec_path) else {}
    spec["removed_keys"] = sorted(removed_set)
    (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    return out


def retrain_args(train_config: dict, data: Path, out: Path, seed: int) -> argparse.Namespace:
    """The base run's trainer arguments (its train_config.json) with the data, output folder
    and seed replaced; from scratch (no --init, no resume), no sample grid or concept check of
    its own (the counterfactual measures presence itself)."""
    args = {k: v for k, v in train_config.items() if k not in _RECORD_KEYS}
    if args.get("init"):
        raise ConfigError(
            "the base run fine-tuned an --init model; the counterfactual retrains from "
            "scratch, so train the base model in one from-scratch run (see "
            "docs/counterfactual-world.md)"
        )
    if args.get("vocabulary", "builtin") != "builtin":
        raise ConfigError(
            f"the base run built its vocabulary from its captions (--vocabulary "
            f"{args['vocabulary']}); a retrain on fewer images would get another tokenizer "
            "(a removed word would vanish from it), so train the base run with "
            "--vocabulary builtin"
        )
    args.update(data=str(data), out=str(out), seed=int(seed), resume=False)
    args.update(
        eval_per_combo=0, check_per_combo=0, grid=None, json=None, ckpt_minutes=float("inf")
    )
    return argparse.Namespace(**args)


def retrain(train_config: dict, data: str, removed: Sequence[str], seed: int, out: Path) -> Path:
    """Train from scratch on `data` minus `removed` with the recipe of `train_config`; returns
    the model directory. Raises ConfigError when the run stopped before its steps (a
    wall-clock stop would make retrains incomparable)."""
    from ctrak.toy.train import train

    subset = write_subset(data, out / "data", removed)
    summary = train(retrain_args(train_config, subset, out / "train", seed))
    if summary["steps"] != train_config["steps"]:
        raise ConfigError(
            f"retrain stopped at step {summary['steps']} of {train_config['steps']} "
            "(--max-minutes of the base run); rerun the base run without a wall-clock stop"
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Path(summary["model"])


# ---- presence ------------------------------------------------------------------------------
def presence(
    model_dir: Path, world: str, prompt: str, *, draws: int, guidance: float, steps: int, seed: int
) -> dict:
    """Draw `prompt` `draws` times and classify each draw: {"shape", "colour", "both"}, each a
    `rate` (the share of draws whose attribute reads as the prompt's), and "labels"
    (the classifier's (shape, colour) counts)."""
    from ctrak.generation import generate_images, to_uint8
    from ctrak.model import DiffusionModel
    from ctrak.toy.worlds import classify, world_combos

    combo = next((c for c in world_combos(world) if c.caption == prompt), None)
    if combo is None:
        raise ConfigError(f"prompt {prompt!r} is not a combination of world {world!r}")
    model = DiffusionModel.load(model_dir)
    images = to_uint8(
        generate_images(model, [prompt] * draws, seed=seed, num_steps=steps, guidance=guidance)
    )
    labels = [classify(image, world) for image in images]
    want = (combo.shape, combo.colour)
    counts: dict[str, int] = {}
    for lab in labels:
        counts[f"{lab[0]}/{lab[1]}"] = counts.get(f"{lab[0]}/{lab[1]}", 0) + 1
    return {
        "shape": rate(sum(lab[0] == want[0] for lab in labels), draws),
        "colour": rate(sum(lab[1] == want[1] for lab in labels), draws),
        "both": rate(sum(lab == want for lab in labels), draws),
        "labels": dict(sorted(counts.items())),
    }


def attribute_of(world: str, value: str) -> str:
    """ "red" -> "colour", "triangle" -> "shape" in the world's vocabulary."""
    from ctrak.toy.worlds import WORLDS

    for attr, key in (("shape", "shapes"), ("colour", "colours")):
        if value in WORLDS[world][key]:
            return attr
    raise ConfigError(f"target {value!r} is neither a shape nor a colour of world {world!r}")
