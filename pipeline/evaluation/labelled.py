"""What `ctrak eval` evaluates on: a built-in synthetic world (from the model's data_spec.json)
or any labelled img2dataset set (`--data SHARDS --labels KEY,KEY`).

Either way a `Bench` holds the attributes, every combination (its prompt, values and whether
training lacks it), a reader that gives the attribute values of a generated image (the
world's hand-written `classify`, or the labelled set's small CNN, `ctrak.toy.classifier`) and
the training rows. Before any work `check_texts` refuses a prompt, concept or negative the
model's tokenizer cannot represent, and `check_learned` a target the model does not draw
(`ctrak.toy.concept_check`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ctrak.model import DiffusionModel


@dataclass(frozen=True)
class BenchCombo:
    caption: str
    values: tuple[str, ...]  # one per Bench.attributes
    heldout: bool
    info: dict = field(default_factory=dict, compare=False)  # recorded with its query images


@dataclass
class Bench:
    name: str  # the world, or "labelled"
    attributes: tuple[str, ...]
    combos: list[BenchCombo]
    read: Callable[[np.ndarray], tuple]  # (H, W, 3) uint8 -> one value (or None) per attribute
    load_rows: Callable[[], tuple[torch.Tensor, list[str], list[dict]]] | None
    describe: dict = field(default_factory=dict)  # data, labels, classifier and its accuracy
    check: Callable[..., dict] | None = None  # (model, **kwargs) -> a fresh concept check
    classifier: Callable[[], dict] | None = None  # its description and accuracy (labelled)

    def selected(self, captions: Sequence[str] | None) -> list[BenchCombo]:
        return [c for c in self.combos if captions is None or c.caption in captions]


def world_bench(world: str, load_rows: Callable | None = None) -> Bench:
    """A built-in world (`load_rows`: its training rows, generated only when loaded)."""
    from ctrak.toy.concept_check import world_check
    from ctrak.toy.worlds import classify, world_combos

    combos = [
        BenchCombo(
            c.caption, (c.shape, c.colour), c.heldout, {"shape": c.shape, "colour": c.colour}
        )
        for c in world_combos(world)
    ]
    return Bench(
        name=world,
        attributes=("shape", "colour"),
        combos=combos,
        read=lambda image: classify(image, world),
        load_rows=load_rows,
        check=lambda model, **kw: world_check(model, world, **kw),
    )


def labelled_bench(
    data: str,
    labels: str | Sequence[str],
    *,
    caption_template: str | None,
    work: Path,
    num_train: int | None,
    log: Callable[[str], None] = print,
) -> Bench:
    """A labelled set: combinations and held-out ones from its labels, prompts from its
    captions' wording, its classifier trained (or read from the work cache) here."""
    from ctrak.toy.classifier import classifier_for
    from ctrak.toy.concept_check import labelled_check
    from ctrak.toy.labelled import load_labelled

    labelled = load_labelled(data, labels, caption_template=caption_template, num_rows=num_train)
    trained: list = []  # the classifier, trained on first use (after the refusals)

    def classifier():
        if not trained:
            trained.append(classifier_for(labelled, work / "cache", log))
        return trained[0]

    combos = [
        BenchCombo(
            c.caption,
            c.values,
            c.heldout,
            {"labels": dict(zip(labelled.attributes, c.values, strict=True))},
        )
        for c in labelled.combos
    ]
    heldout = [c.caption for c in combos if c.heldout]
    log(
        f"labelled set {data}: {len(labelled.keys)} rows, attributes "
        + ", ".join(f"{a} {list(v)}" for a, v in labelled.values.items())
        + f"; prompt {labelled.template!r}; held out (absent from training): {heldout or 'none'}"
    )
    return Bench(
        name="labelled",
        attributes=labelled.attributes,
        combos=combos,
        read=lambda image: classifier().predict_uint8(image),
        load_rows=lambda: (labelled.images, labelled.captions, labelled.labels),
        describe={
            "data": data,
            "labels": list(labelled.attributes),
            "caption_template": labelled.template,
            "heldout_combos": heldout,
        },
        classifier=lambda: classifier().describe(),
        check=lambda model, **kw: labelled_check(model, labelled, classifier(), **kw),
    )


def check_texts(model: DiffusionModel, combos: Sequence[BenchCombo]) -> None:
    """The token check (`ctrak.tokens`) of every query's prompt, concept and negative, before
    any work: an [UNK] or truncated word is refused, named."""
    from ctrak.attribution import resolve_negative
    from ctrak.tokens import check_query_text

    for combo in combos:
        for value in combo.values:
            negative = resolve_negative(combo.caption, value, None)
            check_query_text(model, combo.caption, value, negative)


def check_learned(
    model: DiffusionModel,
    bench: Bench,
    combos: Sequence[BenchCombo],
    *,
    min_rate: float,
    guidance: float,
    per_combo: int,
    work: Path,
    log: Callable[[str], None] = print,
) -> dict | None:
    """The model's concept check (MODEL/concept_check.json when made for these weights at
    this guidance, else drawn now and kept in `work`), enforced on the targets of `combos`."""
    from ctrak.toy.concept_check import load_check, require_learned, summary_line

    if min_rate <= 0:
        return None
    check, where = load_check(model, guidance), f"{model.path}/concept_check.json"
    if check is not None and set(check["attributes"]) != set(bench.attributes):
        check = None  # made on other attributes
    if check is None:
        check = bench.check(model, per_combo=per_combo, guidance=guidance, steps=25, seed=0)
        path = work / f"concept-check-{bench.name}-{model.fingerprint}-g{guidance:g}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(check, indent=2) + "\n")
        where = f"drawn now, {path}"
    log(f"{summary_line(check)} ({where})")
    targets = [(a, v) for c in combos for a, v in zip(bench.attributes, c.values, strict=True)]
    require_learned(check, targets, min_rate, where)
    return check
