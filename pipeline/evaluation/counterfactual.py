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
the same images (the whole-image baselines ignore the concept) share one retrain. The table:
`pipeline.evaluation.counterfactual_table`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ctrak.errors import ConfigError
from pipeline.evaluation.synthetic_bench import Variant

RANDOM = "random"
ATTRIBUTES = ("shape", "colour")
# keys of a train-toy run's train_config.json that are records, not trainer arguments
_RECORD_KEYS = ("data_spec", "num_train_images", "image_size")


@dataclass(frozen=True)
class Plan:
    """One counterfactual measurement. `run`: a `ctrak train-toy` output folder (its
    train_config.json is the recipe, its model/ the base model that ranks). `sizes`: numbers
    of removed images. `seeds`: training seeds of the no-removal baseline (the first is the
    seed every removal retrains with)."""

    run: Path
    prompt: str
    targets: tuple[str, ...]
    variants: tuple[Variant, ...]
    sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    draws: int = 128
    guidance: float = 1.0
    sample_steps: int = 25
    rank_draws: int = 16
    draw_seed: int = 7
    random: bool = True
    reuse_base: bool = False  # the no-removal job at the base seed reads the base model
    random_seed: int = 0
    work: Path = Path("runs/counterfactual")
    extra: dict = field(default_factory=dict)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k / n (Wilson 1927)."""
    if n <= 0 or not 0 <= k <= n:
        raise ConfigError(f"wilson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    # 1. centre and half-width of the score interval
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict:
    """{"k", "n", "rate", "lo", "hi"}: a rate with its Wilson 95% interval."""
    lo, hi = wilson(k, n)
    return {"k": int(k), "n": int(n), "rate": k / n, "lo": lo, "hi": hi}


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
    from ctrak.kernel import scores, solve
    from pipeline.evaluation.synthetic_bench import _features

    attributor = Attributor(model, variant.config)
    features, _ = _features(attributor, images, captions, cache)
    kernel = attributor.fit(features)
    query_cfg = replace(
        variant.config.query, scope="global", num_draws=draws, sample_guidance=guidance
    )
    g = attributor.query_gradient(Query(prompt, concept=concept), query_cfg)
    x = solve(kernel, g[None].cpu())  # (1, k)
    return scores(features, x)[0].double().numpy()


def ranking(scores: np.ndarray) -> np.ndarray:
    """(N,) scores -> row indices, highest score first (ties: lower row first)."""
    return np.argsort(-scores, kind="stable")


def random_ranking(n: int, seed: int) -> np.ndarray:
    """A seeded uniform permutation of range(n): the random-removal control."""
    from ctrak.seeds import generator

    return torch.randperm(n, generator=generator(seed, "counterfactual-random")).numpy()


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
    and seed replaced; from scratch (no --init, no resume), no sample grid of its own."""
    args = {k: v for k, v in train_config.items() if k not in _RECORD_KEYS}
    if args.get("init"):
        raise ConfigError(
            "the base run fine-tuned an --init model; the counterfactual retrains from "
            "scratch, so train the base model in one from-scratch run (see "
            "docs/counterfactual-world.md)"
        )
    args.update(data=str(data), out=str(out), seed=int(seed), resume=False)
    args.update(eval_per_combo=0, grid=None, json=None, ckpt_minutes=float("inf"))
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


# ---- the measurement -----------------------------------------------------------------------
def _json_atomic(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def attribute_of(world: str, value: str) -> str:
    """ "red" -> "colour", "triangle" -> "shape" in the world's vocabulary."""
    from ctrak.toy.worlds import WORLDS

    for attr, key in (("shape", "shapes"), ("colour", "colours")):
        if value in WORLDS[world][key]:
            return attr
    raise ConfigError(f"target {value!r} is neither a shape nor a colour of world {world!r}")


def rankings(plan: Plan, log: Callable[[str], None] = print) -> dict:
    """{(ranking name, target): row order (N,)} for every variant and target, plus the
    random ranking (one for all targets); cached under <work>/rankings/."""
    from ctrak.model import DiffusionModel

    config = json.loads((plan.run / "train_config.json").read_text())
    images, captions, keys, _ = load_training_set(config["data"])
    out = {}
    model = None
    for variant in plan.variants:
        for target in plan.targets:
            path = plan.work / "rankings" / f"{variant.name}-{target}.json".replace(" ", "_")
            if not path.is_file():
                model = model or DiffusionModel.load(plan.run / "model")
                s = method_scores(
                    model,
                    variant,
                    images,
                    captions,
                    plan.prompt,
                    target,
                    draws=plan.rank_draws,
                    guidance=plan.guidance,
                    cache=plan.work / "cache",
                )
                _json_atomic(path, {"keys": keys, "scores": s.tolist()})
                log(f"ranked {variant.name} / {target}")
            out[(variant.name, target)] = ranking(np.array(json.loads(path.read_text())["scores"]))
    if plan.random:
        for target in plan.targets:
            out[(RANDOM, target)] = random_ranking(len(keys), plan.random_seed)
    return out


def _removals(plan: Plan, orders: dict, keys: list[str]) -> list[dict]:
    """The retrains in run order (what lands first when the budget runs out): the no-removal
    baseline at the first seed; the largest size for every ranking of the first target; the
    other baseline seeds; then the remaining (size, target) blocks, largest size first."""

    def none(seed: int) -> dict:
        return {"ranking": "none", "target": None, "m": 0, "seed": seed, "removed": []}

    jobs = [none(plan.seeds[0])]
    for i, m in enumerate(sorted(plan.sizes, reverse=True)):
        for j, target in enumerate(plan.targets):
            for (name, t), order in orders.items():
                if t == target:
                    removed = [keys[k] for k in order[:m]]
                    jobs.append(
                        {"ranking": name, "target": t, "m": m, "seed": plan.seeds[0]}
                        | {"removed": removed}
                    )
            if i == j == 0:
                jobs += [none(seed) for seed in plan.seeds[1:]]
    return jobs


def _retrain_result(plan: Plan, config: dict, job: dict, log: Callable[[str], None]) -> dict:
    """One retrain's cached result (retrained, drawn and classified when not cached)."""
    import shutil
    import time

    folder = plan.work / "retrains" / removal_id(job["removed"], job["seed"])
    path = folder / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = time.time()
    reuse = plan.reuse_base and not job["removed"] and job["seed"] == config["seed"]
    if reuse:  # the base run is this retrain (same recipe, data and seed: bit for bit)
        model_dir = plan.run / "model"
        with (plan.run / "train_log.jsonl").open() as handle:
            elapsed = [json.loads(line).get("elapsed_s", 0.0) for line in handle]
        train_minutes = max(elapsed) / 60
    else:
        model_dir = retrain(config, config["data"], job["removed"], job["seed"], folder)
        train_minutes = (time.time() - start) / 60
    found = presence(
        model_dir,
        config["world"],
        plan.prompt,
        draws=plan.draws,
        guidance=plan.guidance,
        steps=plan.sample_steps,
        seed=plan.draw_seed,
    )
    weights = (model_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    result = {
        "removed": sorted(job["removed"]),
        "seed": job["seed"],
        "presence": found,
        "train_minutes": round(train_minutes, 2),
        "unet_sha256": hashlib.sha256(weights).hexdigest(),
        "reused_base": reuse,
    }
    # the resume state and checkpoints go; the subset (what it trained on), model and result stay
    shutil.rmtree(folder / "train" / "checkpoints", ignore_errors=True)
    (folder / "train" / "state.pt").unlink(missing_ok=True)
    _json_atomic(path, result)
    log(
        f"retrain {job['ranking']}/{job['target']}/m={job['m']}/seed={job['seed']}: "
        f"{train_minutes:.1f} min; shape {found['shape']['rate']:.2f} "
        f"colour {found['colour']['rate']:.2f}"
    )
    return result


def measure(
    plan: Plan,
    log: Callable[[str], None] = print,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Rank, remove, retrain, draw (module doc). Returns the JSON-able result; `on_update`
    gets the partial result after every retrain (to write and commit as it comes)."""
    config = json.loads((plan.run / "train_config.json").read_text())
    world = config["world"]
    for target in plan.targets:
        attribute_of(world, target)
    _, _, keys, labels = load_training_set(config["data"])
    orders = rankings(plan, log)
    result = {
        "run": str(plan.run),
        "world": world,
        "prompt": plan.prompt,
        "targets": list(plan.targets),
        "num_train": len(keys),
        "sizes": list(plan.sizes),
        "seeds": list(plan.seeds),
        "draws": plan.draws,
        "guidance": plan.guidance,
        "sample_steps": plan.sample_steps,
        "rank_draws": plan.rank_draws,
        "draw_seed": plan.draw_seed,
        "train_steps": config["steps"],
        "variants": {v.name: v.config.provenance() for v in plan.variants},
        **plan.extra,
        "records": [],
    }
    key_row = {k: i for i, k in enumerate(keys)}
    for job in _removals(plan, orders, keys):
        found = _retrain_result(plan, config, job, log)
        rows = [labels[key_row[k]] for k in job["removed"]]
        combos: dict[str, int] = {}
        for lab in rows:
            name = f"{lab['colour']} {lab['shape']}"
            combos[name] = combos.get(name, 0) + 1
        record = {k: v for k, v in job.items() if k != "removed"}
        record.update(
            retrain=removal_id(job["removed"], job["seed"]),
            removed_by_combo=dict(sorted(combos.items())),
            train_minutes=found["train_minutes"],
            unet_sha256=found["unet_sha256"],
            presence=found["presence"],
        )
        if job["target"] is not None:
            attr = attribute_of(world, job["target"])
            record["attribute"] = attr
            record["removed_with_target"] = sum(lab[attr] == job["target"] for lab in rows)
        result["records"].append(record)
        if on_update is not None:
            on_update(result)
    return result
