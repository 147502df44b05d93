"""A small attribute classifier for a labelled set: one tiny CNN per attribute, trained on CPU
on the labelled training images, its accuracy measured on a held-out split of them.

It confirms generated query images (local scope keeps an image only when the classifier reads
the intended combination) and scores the concept check's draws (`ctrak.toy.concept_check`).
Architecture: 3 conv layers (3x3, ReLU; width w, 2w, 2w; 2x max-pool after the first two),
2x2 average pool, a linear head; cross-entropy, Adam.

The trap: training holds only some combinations, so a CNN can read one attribute off another
(toy-paper's rows have no red triangle: "red" predicts "circle"). A plain 2-head CNN trained on
toy-paper's 1,200 rows read 100% of its split right and 0.25% of the shapes of 400 held-out red
triangles (runs of `docs/owndata.md`). So each attribute is read through a *view* that removes
the cues other attributes could lend, the first of these (rule fixed before measuring) whose
split accuracy reaches MIN_SPLIT_ACCURACY:

1. `scramble-colour`: in training, each image's RGB channels in a random order, each times a
   random gain in [0.25, 1] and a random sign (at reading, unchanged): the attribute is read
   without colour identity (a shape, a size). A plain channel permutation is not enough: the
   multiset of a colour's channel values survives it, and toy-paper's colour head read its
   split 100% right through it and 0.25% of the held-out red triangles' colour;
2. `histogram`: the image's pixels sorted by brightness (training and reading): the attribute
   is read without layout (a colour, a background);
3. `none`: the image as it is (nothing removed; the classifier says so in its description).

Its accuracy on held-out *combinations* cannot be measured on a user's set (there are no such
images); the views are what makes it plausible, and `describe()` records which view each
attribute got.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctrak.errors import LabelError
from ctrak.seeds import generator

VERSION = "ctrak-attribute-cnn/2"
VIEWS = ("scramble-colour", "histogram", "none")
MIN_SPLIT_ACCURACY = 0.95


def view(x: torch.Tensor, name: str, gen: torch.Generator | None = None) -> torch.Tensor:
    """x (B, 3, H, W) -> the view `name` of it (same shape); `gen`: training (random parts)."""
    if name == "histogram":
        flat = x.flatten(2)  # (B, 3, HW)
        order = flat.sum(dim=1).argsort(dim=1)  # (B, HW) by brightness
        return flat.gather(2, order[:, None, :].expand_as(flat)).view_as(x)
    if name == "scramble-colour" and gen is not None:
        # 1. channels in a random order; 2. each times a random gain in [0.25, 1] and sign
        b = x.shape[0]
        perms = torch.stack([torch.randperm(3, generator=gen) for _ in range(b)])
        gain = 0.25 + 0.75 * torch.rand(b, 3, 1, 1, generator=gen)
        sign = torch.where(torch.rand(b, 3, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
        return x[torch.arange(b)[:, None], perms] * gain * sign
    return x


class AttributeCNN(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> one logit tensor (B, n_values[k]) per head."""

    def __init__(self, n_values: Sequence[int], width: int = 16) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.heads = nn.ModuleList(nn.Linear(8 * w, n) for n in n_values)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.body(x)
        return [head(h) for head in self.heads]


@dataclass
class AttributeClassifier:
    """One trained AttributeCNN per attribute, its view, and the names of its outputs."""

    attributes: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    nets: dict[str, AttributeCNN]
    views: dict[str, str]
    accuracy: dict[str, float]  # per attribute, on the held-out split, through its view
    tried: dict[str, dict[str, float]]  # per attribute: split accuracy of each view tried
    split: dict[str, int]  # rows trained on / held out
    width: int = 16

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[tuple[str, ...]]:
        """images (B, 3, H, W) in [-1, 1] -> per image one value per attribute."""
        picks = {}
        for a in self.attributes:
            self.nets[a].eval()
            picks[a] = self.nets[a](view(images.float(), self.views[a]))[0].argmax(1).tolist()
        return [
            tuple(self.values[a][picks[a][i]] for a in self.attributes)
            for i in range(images.shape[0])
        ]

    def predict_uint8(self, image: np.ndarray) -> tuple[str, ...]:
        """One (H, W, 3) uint8 image -> its values."""
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1
        return self.predict(x[None])[0]

    def describe(self) -> dict:
        return {
            "classifier": VERSION,
            "attributes": list(self.attributes),
            "values": {a: list(v) for a, v in self.values.items()},
            "views": self.views,
            "accuracy": self.accuracy,
            "tried": self.tried,
            "split": self.split,
            "width": self.width,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {a: net.state_dict() for a, net in self.nets.items()}
        torch.save({"meta": self.describe(), "state": state}, tmp)
        tmp.replace(path)


def load_classifier(path: str | Path) -> AttributeClassifier:
    blob = torch.load(path, weights_only=True)
    meta = blob["meta"]
    attributes = tuple(meta["attributes"])
    values = {a: tuple(meta["values"][a]) for a in attributes}
    nets = {}
    for a in attributes:
        nets[a] = AttributeCNN([len(values[a])], meta["width"])
        nets[a].load_state_dict(blob["state"][a])
    return AttributeClassifier(
        attributes,
        values,
        nets,
        meta["views"],
        meta["accuracy"],
        meta["tried"],
        meta["split"],
        meta["width"],
    )


def _fit(images, y, train, test, n_values, view_name, *, epochs, batch_size, lr, width, seed):
    """One attribute's CNN through one view -> (net, accuracy on `test`)."""
    torch.manual_seed(seed)
    net = AttributeCNN([n_values], width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    batches = generator(seed, "classifier-batches", view_name)
    net.train()
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=batches)]
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            logits = net(view(images[idx].float(), view_name, batches))[0]
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(view(images[test].float(), view_name))[0].argmax(dim=1)
    return net, round(float((pred == y[test]).float().mean()), 4)


def train_classifier(
    images: torch.Tensor,
    labels: Sequence[tuple[str, ...]],
    attributes: Sequence[str],
    values: dict[str, tuple[str, ...]],
    *,
    epochs: int = 10,
    holdout: float = 0.2,
    batch_size: int = 64,
    lr: float = 3e-3,
    width: int = 16,
    seed: int = 0,
) -> AttributeClassifier:
    """Per attribute, the first view of VIEWS whose split accuracy reaches MIN_SPLIT_ACCURACY
    (else the best one tried), trained on a seeded (1 - holdout) of the rows.

    images (N, 3, H, W) in [-1, 1]; labels: per row one value per attribute."""
    attributes = tuple(attributes)
    # 1. targets as indices, a seeded split
    y = torch.tensor(
        [[values[a].index(v) for a, v in zip(attributes, row, strict=True)] for row in labels]
    )  # (N, A)
    n = len(labels)
    if n < 2:
        raise LabelError(f"the classifier needs at least 2 labelled rows to split; got {n}")
    order = torch.randperm(n, generator=generator(seed, "classifier-split"))
    n_test = min(max(1, round(holdout * n)), n - 1)
    test, train = order[:n_test], order[n_test:]
    # 2. per attribute, the views in order until one reads the split well enough
    nets, views, accuracy, tried = {}, {}, {}, {}
    kw = dict(epochs=epochs, batch_size=batch_size, lr=lr, width=width, seed=seed)
    for j, a in enumerate(attributes):
        fits = {}
        for name in VIEWS:
            fits[name] = _fit(images, y[:, j], train, test, len(values[a]), name, **kw)
            if fits[name][1] >= MIN_SPLIT_ACCURACY:
                break
        best = next(
            (v for v in fits if fits[v][1] >= MIN_SPLIT_ACCURACY),
            max(fits, key=lambda v: fits[v][1]),
        )
        nets[a], views[a], accuracy[a] = fits[best][0], best, fits[best][1]
        tried[a] = {v: acc for v, (_, acc) in fits.items()}
    split = {"train": len(train), "test": n_test}
    return AttributeClassifier(attributes, dict(values), nets, views, accuracy, tried, split, width)


def classifier_for(labelled, cache: Path | None = None, log=print) -> AttributeClassifier:
    """The classifier of a `ctrak.toy.labelled.LabelledSet` (cached under `cache` by the rows'
    keys and labels); logs its accuracy."""
    import hashlib

    rows = [lab for lab in (labelled.label_tuple(i) for i in range(len(labelled.keys)))]
    digest = hashlib.sha256(
        json.dumps([VERSION, labelled.keys, rows, list(labelled.attributes)]).encode()
    ).hexdigest()[:16]
    path = None if cache is None else Path(cache) / f"classifier-{digest}.pt"
    if path is not None and path.is_file():
        classifier = load_classifier(path)
    else:
        classifier = train_classifier(labelled.images, rows, labelled.attributes, labelled.values)
        if path is not None:
            classifier.save(path)
    log(
        "attribute classifier: accuracy on "
        f"{classifier.split['test']} held-out rows (of {sum(classifier.split.values())}): "
        + ", ".join(
            f"{a} {acc:.3f} (view {classifier.views[a]})" for a, acc in classifier.accuracy.items()
        )
    )
    return classifier
