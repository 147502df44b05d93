"""A labelled set in the img2dataset layout: which `.json` keys are the attributes, their
values, the label combinations the training rows cover and those they leave out (held out),
and the query prompt of every combination, read from the captions' own wording.

The rows come from `ctrak.toy.world_shards.read_samples` ({key}.jpg|png|webp, .txt caption,
.json labels). Attribute values are compared as strings (`str(json value)`). A combination is
held out when every one of its values occurs in training but the combination itself does not.

The prompt of a combination: `template.format(**values)`. The template is either given
(`--caption-template "a {colour} {shape}"`) or inferred: each training caption with each of
its label values (as whole words) replaced by `{attribute}`; every caption must give the same
template, else `CaptionTemplateError` says which rows differ (nothing is guessed).
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ctrak.errors import CaptionTemplateError, LabelError


@dataclass(frozen=True)
class LabelCombo:
    """One combination of attribute values, its query prompt and whether training lacks it."""

    values: tuple[str, ...]  # one per attribute, in LabelledSet.attributes order
    caption: str
    heldout: bool


@dataclass
class LabelledSet:
    """The rows of a labelled set and what the benchmark reads from them."""

    attributes: tuple[str, ...]
    values: dict[str, tuple[str, ...]]  # attribute -> its values, sorted
    images: torch.Tensor  # (N, 3, H, W) float32 in [-1, 1]
    captions: list[str]
    labels: list[dict[str, str]]  # per row: attribute -> value
    keys: list[str]
    template: str
    combos: list[LabelCombo]  # every combination, first attribute major

    @property
    def heldout(self) -> list[LabelCombo]:
        return [c for c in self.combos if c.heldout]

    def label_tuple(self, row: int) -> tuple[str, ...]:
        return tuple(self.labels[row][a] for a in self.attributes)


def parse_labels(text: str | Sequence[str]) -> tuple[str, ...]:
    """ "shape,colour" -> ("shape", "colour"); refuses an empty or repeated key."""
    keys = [k.strip() for k in (text.split(",") if isinstance(text, str) else text)]
    if not keys or any(not k for k in keys) or len(set(keys)) != len(keys):
        raise LabelError(
            f"--labels {text!r}: give the .json keys that are the attributes, comma-separated "
            "and distinct, e.g. --labels shape,colour"
        )
    return tuple(keys)


def row_labels(meta: dict, attributes: Sequence[str], key: str) -> dict[str, str]:
    """The attribute values of one sample's `.json`, as strings; LabelError on a missing key."""
    missing = [a for a in attributes if a not in meta or meta[a] is None]
    if missing:
        raise LabelError(
            f"sample {key}: its .json has no {missing} (it has {sorted(meta)}); every sample "
            "needs every attribute named by --labels"
        )
    return {a: str(meta[a]) for a in attributes}


def _word(value: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(value) + r"(?!\w)")


def infer_template(
    captions: Sequence[str], labels: Sequence[dict[str, str]], keys: Sequence[str]
) -> str:
    """The one caption template of the rows: each caption with each label value (a whole word,
    exactly once) replaced by `{attribute}`. CaptionTemplateError when a caption lacks a
    value, holds one twice, or the captions follow more than one wording."""
    templates: Counter[str] = Counter()
    example: dict[str, str] = {}
    for caption, label, key in zip(captions, labels, keys, strict=True):
        template = caption.replace("{", "{{").replace("}", "}}")
        for attribute, value in sorted(label.items(), key=lambda kv: -len(kv[1])):
            hits = _word(value).findall(template)
            if len(hits) != 1:
                raise CaptionTemplateError(
                    f"sample {key}: caption {caption!r} holds the {attribute} value {value!r} "
                    f"{len(hits)} times (as a whole word); the query prompt of a held-out "
                    "combination is read from the captions by substituting the label values, "
                    "so each must occur once. Pass --caption-template, e.g. "
                    f"'{' '.join('{' + a + '}' for a in label)}'"
                )
            template = _word(value).sub("{" + attribute + "}", template, count=1)
        templates[template] += 1
        example.setdefault(template, key)
    if len(templates) != 1:
        (a, na), (b, nb) = templates.most_common(2)
        raise CaptionTemplateError(
            f"the captions follow {len(templates)} wordings, e.g. {a!r} ({na} rows, sample "
            f"{example[a]}) and {b!r} ({nb} rows, sample {example[b]}): which one a held-out "
            "combination's prompt takes is not in the data. Pass --caption-template"
        )
    return next(iter(templates))


def check_template(template: str, attributes: Sequence[str]) -> str:
    """An explicit template must name exactly the attributes, each once."""
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if sorted(fields) != sorted(attributes):
        raise CaptionTemplateError(
            f"--caption-template {template!r} names {fields}; it must name each attribute "
            f"of --labels once: {list(attributes)}"
        )
    return template


def build_combos(
    attributes: Sequence[str],
    values: dict[str, tuple[str, ...]],
    trained: set[tuple[str, ...]],
    template: str,
) -> list[LabelCombo]:
    """Every combination of the values (first attribute major) with its prompt and flag."""
    return [
        LabelCombo(
            combo,
            template.format(**dict(zip(attributes, combo, strict=True))),
            combo not in trained,
        )
        for combo in itertools.product(*(values[a] for a in attributes))
    ]


def load_labelled(
    uri: str,
    attributes: str | Sequence[str],
    *,
    caption_template: str | None = None,
    num_rows: int | None = None,
    storage_options: dict | None = None,
) -> LabelledSet:
    """Read the rows under `uri` (its first `num_rows`; None = all) with their labels."""
    from ctrak.toy.world_shards import read_samples

    attributes = parse_labels(attributes)
    images, captions, labels, keys = [], [], [], []
    for row in read_samples(uri, storage_options):
        if num_rows is not None and len(keys) >= num_rows:
            break
        labels.append(row_labels(row["labels"], attributes, row["key"]))
        images.append(row["image"])
        captions.append(row["caption"])
        keys.append(row["key"])
    values = {a: tuple(sorted({lab[a] for lab in labels})) for a in attributes}
    single = [a for a in attributes if len(values[a]) < 2]
    if single:
        raise LabelError(
            f"attribute(s) {single} of {uri} take one value only ({[values[a] for a in single]}):"
            " a target needs at least two values to be told apart"
        )
    if caption_template is None:
        template = infer_template(captions, labels, keys)
    else:
        template = check_template(caption_template, attributes)
    trained = {tuple(lab[a] for a in attributes) for lab in labels}
    x0 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return LabelledSet(
        attributes=attributes,
        values=values,
        images=x0,
        captions=captions,
        labels=labels,
        keys=keys,
        template=template,
        combos=build_combos(attributes, values, trained, template),
    )
