"""The counterfactual measurement's orchestration (`ctrak counterfactual`): the plan, the
rankings, the retrains in run order with their on-disk cache, the result. The pieces (ranking,
removal, retraining, presence) are `pipeline.evaluation.counterfactual`; its module doc says
what is measured."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctrak.errors import ConfigError
from pipeline.evaluation.counterfactual import (
    ORACLE,
    RANDOM,
    attribute_of,
    label_ranking,
    load_training_set,
    method_scores,
    presence,
    random_ranking,
    ranking,
    removal_id,
    retrain,
)
from pipeline.evaluation.synthetic_bench import Variant


@dataclass(frozen=True)
class Plan:
    """One counterfactual measurement. `run`: a `ctrak train-toy` output folder (its
    train_config.json is the recipe, its model/ the base model that ranks). `sizes`: numbers
    of removed images. `seeds`: training seeds of the no-removal baseline; every removal
    retrains with the first `removal_seeds` of them (its drop is paired: baseline and removal
    pooled over the same seeds). `reuse_base`: the no-removal job at the base run's seed
    takes the base model instead of retraining it (a retrain reproduces it bit for bit:
    tests/test_counterfactual.py). `min_concept_rate`: a target the base model draws right less
    often on trained combinations is refused before any work (ConceptNotLearnedError, as
    `ctrak eval`); 0 turns the check off."""

    run: Path
    prompt: str
    targets: tuple[str, ...]
    variants: tuple[Variant, ...]
    sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    removal_seeds: int = 1
    draws: int = 128
    guidance: float = 1.0
    sample_steps: int = 25
    rank_draws: int = 16
    draw_seed: int = 7
    random: bool = True
    oracle: bool = False
    cached_only: bool = False  # report the retrains already done, train nothing
    reuse_base: bool = False  # the no-removal job at the base seed reads the base model
    random_seed: int = 0
    min_concept_rate: float = 0.8  # = ctrak.toy.concept_check.DEFAULT_MIN_RATE, as ctrak eval
    work: Path = Path("runs/counterfactual")
    extra: dict = field(default_factory=dict)


def _json_atomic(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def rankings(plan: Plan, log: Callable[[str], None] = print) -> dict:
    """{(ranking name, target): row order (N,)} for every variant and target, plus the
    random ranking (one for all targets) and, with `plan.oracle`, the label ranking; the
    methods' scores cached under <work>/rankings/."""
    from ctrak.model import DiffusionModel

    config = json.loads((plan.run / "train_config.json").read_text())
    images, captions, keys, labels = load_training_set(config["data"])
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
    if plan.oracle:
        for target in plan.targets:
            attr = attribute_of(config["world"], target)
            out[(ORACLE, target)] = label_ranking(labels, attr, target, plan.random_seed)
    return out


def concept_check(plan: Plan, world: str, log: Callable[[str], None] = print) -> dict | None:
    """The base model's concept check (its concept_check.json when made for these weights at
    the plan's guidance, else drawn now and kept under <work>), enforced on the targets."""
    from ctrak.model import DiffusionModel
    from ctrak.toy.concept_check import load_check, require_learned, summary_line, world_check

    if plan.min_concept_rate <= 0:
        return None
    model = DiffusionModel.load(plan.run / "model")
    check, where = load_check(model, plan.guidance), f"{plan.run}/model/concept_check.json"
    if check is None:
        path = plan.work / f"concept-check-{model.fingerprint}-g{plan.guidance:g}.json"
        if path.is_file():
            check = json.loads(path.read_text())
        else:
            check = world_check(model, world, per_combo=16, guidance=plan.guidance, seed=0)
            _json_atomic(path, check)
        where = str(path)
    log(f"{summary_line(check)} ({where})")
    targets = [(attribute_of(world, t), t) for t in plan.targets]
    require_learned(check, targets, plan.min_concept_rate, where)
    return check


def _removals(plan: Plan, orders: dict, keys: list[str]) -> list[dict]:
    """The retrains in run order (what lands first when the budget runs out): the no-removal
    baseline at the first seed; the largest size for every ranking of the first target; the
    other baseline seeds; then the remaining (size, target) blocks, largest size first; then
    the same removals again at each further removal seed."""
    if not 1 <= plan.removal_seeds <= len(plan.seeds):
        raise ConfigError(
            f"removal_seeds={plan.removal_seeds}: need 1 <= removal_seeds <= the number of "
            f"seeds ({len(plan.seeds)}); pass more --seeds"
        )

    def none(seed: int) -> dict:
        return {"ranking": "none", "target": None, "m": 0, "seed": seed, "removed": []}

    jobs, removals = [none(plan.seeds[0])], []
    for i, m in enumerate(sorted(plan.sizes, reverse=True)):
        for j, target in enumerate(plan.targets):
            for (name, t), order in orders.items():
                if t == target:
                    removed = [keys[k] for k in order[:m]]
                    removals.append({"ranking": name, "target": t, "m": m, "removed": removed})
                    jobs.append(removals[-1] | {"seed": plan.seeds[0]})
            if i == j == 0:
                jobs += [none(seed) for seed in plan.seeds[1:]]
    for seed in plan.seeds[1 : plan.removal_seeds]:
        jobs += [job | {"seed": seed} for job in removals]
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
    check = concept_check(plan, world, log)
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
        "removal_seeds": plan.removal_seeds,
        "draws": plan.draws,
        "guidance": plan.guidance,
        "sample_steps": plan.sample_steps,
        "rank_draws": plan.rank_draws,
        "draw_seed": plan.draw_seed,
        "train_steps": config["steps"],
        "variants": {v.name: v.config.provenance() for v in plan.variants},
        "concept_check": check and {"min_rate": plan.min_concept_rate, **check},
        **plan.extra,
        "records": [],
    }
    key_row = {k: i for i, k in enumerate(keys)}
    for job in _removals(plan, orders, keys):
        done = plan.work / "retrains" / removal_id(job["removed"], job["seed"]) / "result.json"
        if plan.cached_only and not done.is_file():
            continue  # a report of what is done: the rest is left to a later run
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
            reused_base=found.get("reused_base", False),
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
