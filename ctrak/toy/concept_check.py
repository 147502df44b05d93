"""The concept check: does the model draw each attribute value it is asked for?

For every combination (trained and held out) the model draws `per_combo` images at the draw
guidance (`ctrak.generation.sample`, DDIM); a classifier reads each draw's attribute values.
Per attribute value: the share of draws of the combinations holding it whose value is read
right, on trained combinations and on held-out ones. A concept the model does not draw
(e.g. an object word its tokenizer maps to [UNK]) gets a ranking that measures nothing, so
`ctrak eval` refuses a target whose value is drawn right less than a threshold (0.8) on the
trained combinations (`require_learned`).

Classifiers: the built-in worlds use their hand-written `ctrak.toy.worlds.classify` (the same
filter their eval's query images go through, and independent of the training set's attribute
correlations); a user's labelled set uses `ctrak.toy.classifier` trained on its shards.
Written by `ctrak train-toy` (end of training) and `ctrak check-concepts` as
MODEL/concept_check.json; the model's fingerprint leaves that file out (`ctrak.model`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctrak.errors import ConceptNotLearnedError
from ctrak.model import DiffusionModel

CHECK_VERSION = "ctrak-concept-check/1"
CHECK_FILE = "concept_check.json"
DEFAULT_MIN_RATE = 0.8
FIX = (
    "train longer (train-toy --steps), with more capacity (--channels, --layers-per-block), or "
    "fine-tune with --attribute-dropout 0.3 (TRAINING.md); make sure the word is in the "
    "model's vocabulary (tokenizer/vocabulary.json). --min-concept-rate 0 reports it anyway"
)


@dataclass(frozen=True)
class CheckCombo:
    caption: str
    values: tuple[str, ...]
    heldout: bool


Reader = Callable[[np.ndarray], tuple]  # (H, W, 3) uint8 -> one value (or None) per attribute


def run_check(
    model: DiffusionModel,
    attributes: Sequence[str],
    combos: Sequence[CheckCombo],
    read: Reader,
    *,
    classifier: dict,
    per_combo: int = 16,
    guidance: float = 1.0,
    steps: int = 25,
    seed: int = 0,
    chunk: int = 64,
) -> dict:
    """Draw every combination, read the draws, tally per attribute value (module doc).

    Draw j of combination i uses initial noise i * per_combo + j under `seed` (as
    `ctrak.toy.samples.evaluate_samples`), whatever the chunking."""
    from ctrak.generation import sample, to_uint8

    prompts = [c.caption for c in combos for _ in range(per_combo)]
    read_values = []
    for start in range(0, len(prompts), chunk):
        x0 = sample(
            model,
            prompts[start : start + chunk],
            seed=seed,
            first_draw=start,
            num_steps=steps,
            guidance=guidance,
        )
        read_values += [tuple(read(img)) for img in to_uint8(model.x0_to_images(x0))]
    tally: dict[str, dict[str, dict[str, list[int]]]] = {a: {} for a in attributes}
    combo_rows = []
    for i, combo in enumerate(combos):
        got = read_values[i * per_combo : (i + 1) * per_combo]
        split = "heldout" if combo.heldout else "trained"
        for j, (attribute, value) in enumerate(zip(attributes, combo.values, strict=True)):
            cell = tally[attribute].setdefault(value, {"trained": [0, 0], "heldout": [0, 0]})
            cell[split][0] += sum(g[j] == value for g in got)
            cell[split][1] += len(got)
        combo_rows.append(
            {
                "caption": combo.caption,
                "heldout": combo.heldout,
                "values": list(combo.values),
                "n": len(got),
                "correct": sum(g == combo.values for g in got),
                **{
                    f"{a}_ok": sum(g[j] == v for g in got)
                    for j, (a, v) in enumerate(zip(attributes, combo.values, strict=True))
                },
            }
        )
    rates = {
        attribute: {
            value: {
                f"{split}{suffix}": ((round(k / n, 4) if n else None) if suffix == "" else n)
                for split, (k, n) in cell.items()
                for suffix in ("", "_draws")
            }
            for value, cell in sorted(values.items())
        }
        for attribute, values in tally.items()
    }
    return {
        "check": CHECK_VERSION,
        "model_fingerprint": model.fingerprint,
        "guidance": guidance,
        "per_combo": per_combo,
        "steps": steps,
        "seed": seed,
        "classifier": classifier,
        "attributes": rates,
        "combos": combo_rows,
    }


def world_inputs(world: str) -> tuple[tuple[str, ...], list[CheckCombo], Reader, dict]:
    """(attributes, combos, reader, classifier) of a built-in world: its hand-written
    `classify`."""
    from ctrak.toy.worlds import classify, world_combos

    combos = [CheckCombo(c.caption, (c.shape, c.colour), c.heldout) for c in world_combos(world)]
    described = {"classifier": "ctrak.toy.worlds.classify (hand-written)", "world": world}
    return ("shape", "colour"), combos, lambda image: classify(image, world), described


def labelled_inputs(labelled, classifier) -> tuple[tuple[str, ...], list[CheckCombo], Reader, dict]:
    """(attributes, combos, reader, classifier) of a `LabelledSet` and its
    `AttributeClassifier`."""
    combos = [CheckCombo(c.caption, c.values, c.heldout) for c in labelled.combos]
    return tuple(labelled.attributes), combos, classifier.predict_uint8, classifier.describe()


def world_check(model: DiffusionModel, world: str, **kwargs) -> dict:
    """The check on a built-in world, read by its hand-written `classify`."""
    attributes, combos, read, described = world_inputs(world)
    return run_check(model, attributes, combos, read, classifier=described, **kwargs)


def labelled_check(model: DiffusionModel, labelled, classifier, **kwargs) -> dict:
    """The check on a `LabelledSet`, read by its `AttributeClassifier`."""
    attributes, combos, read, described = labelled_inputs(labelled, classifier)
    return run_check(model, attributes, combos, read, classifier=described, **kwargs)


def save_check(model_dir: str | Path, check: dict) -> Path:
    path = Path(model_dir) / CHECK_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(check, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_check(model: DiffusionModel, guidance: float) -> dict | None:
    """MODEL/concept_check.json when it was made for this model's weights at `guidance`."""
    path = Path(model.path) / CHECK_FILE
    if not model.path or not path.is_file():
        return None
    check = json.loads(path.read_text())
    if check.get("model_fingerprint") != model.fingerprint or check.get("guidance") != guidance:
        return None
    return check


def summary_line(check: dict) -> str:
    """ "concept check (guidance 1, 16 draws per combination): shape triangle 0.97 / 0.88, ..."
    (trained / held out, "-" where no combination of that kind holds the value)."""

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    parts = [
        f"{a} {value} {fmt(r['trained'])} / {fmt(r['heldout'])}"
        for a, values in check["attributes"].items()
        for value, r in values.items()
    ]
    return (
        f"concept check (guidance {check['guidance']:g}, {check['per_combo']} draws per "
        "combination; rate read right on trained / held-out combinations): " + ", ".join(parts)
    )


def require_learned(
    check: dict, targets: Iterable[tuple[str, str]], min_rate: float, where: str
) -> None:
    """ConceptNotLearnedError naming every (attribute, value) target drawn right less than
    `min_rate` of the time on trained combinations, with the check's numbers."""
    failing = []
    for attribute, value in dict.fromkeys(targets):
        cell = check["attributes"].get(attribute, {}).get(value)
        if cell is None or cell["trained"] is None or cell["trained"] < min_rate:
            failing.append((attribute, value, cell))
    if failing:
        described = "; ".join(
            f"{a}={v!r}: "
            + (
                "not in the check"
                if c is None or c["trained"] is None
                else f"{c['trained']:.2f} of {c['trained_draws']} draws on trained combinations"
                + (f", {c['heldout']:.2f} on held-out ones" if c["heldout"] is not None else "")
            )
            for a, v, c in failing
        )
        raise ConceptNotLearnedError(
            f"the model does not draw these targets right at least {min_rate:.0%} of the time "
            f"(concept check at guidance {check['guidance']:g}, {check['per_combo']} draws per "
            f"combination, {where}): {described}. Attributing a concept the model has not "
            f"learned measures nothing. Fix: {FIX}"
        )


def model_inputs(
    model: DiffusionModel,
    *,
    data: str | None = None,
    labels: str | Sequence[str] | None = None,
    caption_template: str | None = None,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[tuple[str, ...], list[CheckCombo], Reader, dict]:
    """(attributes, combos, reader, classifier) for a loaded model: a labelled set's (`data` +
    `labels`: its classifier) or the built-in world's named by the model's data_spec.json."""
    from ctrak.errors import ConfigError

    if labels:
        if not data:
            raise ConfigError("--labels needs --data (the labelled shards the model learned)")
        from ctrak.toy.classifier import classifier_for
        from ctrak.toy.labelled import load_labelled

        labelled = load_labelled(data, labels, caption_template=caption_template)
        return labelled_inputs(labelled, classifier_for(labelled, cache, log))
    spec_path = Path(model.path) / "data_spec.json"
    world = json.loads(spec_path.read_text()).get("world") if spec_path.is_file() else None
    if not world:
        raise ConfigError(
            f"{model.path} names no built-in world (data_spec.json); pass --data SHARDS "
            "--labels KEY,KEY to check it on a labelled set"
        )
    return world_inputs(world)
