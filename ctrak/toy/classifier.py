"""A small attribute classifier for a labelled set: a tiny CNN with one head per attribute,
trained on CPU on the labelled training images, its accuracy measured on a held-out split.

It confirms generated query images (local scope keeps an image only when the classifier reads
the intended combination) and scores the concept check's draws (`ctrak.toy.concept_check`).
Architecture: 3 conv layers (3x3, ReLU; width w, 2w, 2w; 2x max-pool after the first two),
2x2 average pool, one linear head per attribute. Loss: the sum of the heads' cross-entropies.

Its accuracy is measured on rows of the *trained* combinations (the only labelled images there
are); on held-out combinations it is untested, and a CNN trained where attributes co-occur can
lean on one attribute to read another - the concept check reports its held-out numbers as
read by this classifier, so read them with that in mind.
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

VERSION = "ctrak-attribute-cnn/1"


class AttributeCNN(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> one logit tensor (B, n_values[a]) per attribute."""

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
    """A trained AttributeCNN and the names of its outputs."""

    attributes: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    net: AttributeCNN
    accuracy: dict[str, float]  # per attribute, on the held-out split
    split: dict[str, int]  # rows trained on / held out
    width: int = 16

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[tuple[str, ...]]:
        """images (B, 3, H, W) in [-1, 1] -> per image one value per attribute."""
        self.net.eval()
        logits = self.net(images.float())
        picks = [lg.argmax(dim=1).tolist() for lg in logits]
        return [
            tuple(self.values[a][picks[j][i]] for j, a in enumerate(self.attributes))
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
            "accuracy": self.accuracy,
            "split": self.split,
            "width": self.width,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"meta": self.describe(), "state": self.net.state_dict()}, tmp)
        tmp.replace(path)


def load_classifier(path: str | Path) -> AttributeClassifier:
    blob = torch.load(path, weights_only=True)
    meta = blob["meta"]
    attributes = tuple(meta["attributes"])
    values = {a: tuple(meta["values"][a]) for a in attributes}
    net = AttributeCNN([len(values[a]) for a in attributes], meta["width"])
    net.load_state_dict(blob["state"])
    return AttributeClassifier(
        attributes, values, net, meta["accuracy"], meta["split"], meta["width"]
    )


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
    """Train on a random (1 - holdout) of the rows, report accuracy on the rest.

    images (N, 3, H, W) in [-1, 1]; labels: per row one value per attribute."""
    torch.manual_seed(seed)
    attributes = tuple(attributes)
    # 1. targets as indices, a seeded split
    y = torch.tensor(
        [[values[a].index(v) for a, v in zip(attributes, row, strict=True)] for row in labels]
    )  # (N, A)
    n = len(labels)
    order = torch.randperm(n, generator=generator(seed, "classifier-split"))
    if n < 2:
        raise LabelError(f"the classifier needs at least 2 labelled rows to split; got {n}")
    n_test = min(max(1, round(holdout * n)), n - 1)
    test, train = order[:n_test], order[n_test:]
    net = AttributeCNN([len(values[a]) for a in attributes], width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    batches = generator(seed, "classifier-batches")
    # 2. epochs of minibatch Adam on the summed cross-entropies
    net.train()
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=batches)]
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            logits = net(images[idx].float())
            loss = sum(nn.functional.cross_entropy(lg, y[idx, j]) for j, lg in enumerate(logits))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    # 3. accuracy per attribute on the held-out rows
    net.eval()
    with torch.no_grad():
        logits = net(images[test].float())
    accuracy = {
        a: round(float((lg.argmax(dim=1) == y[test, j]).float().mean()), 4)
        for j, (a, lg) in enumerate(zip(attributes, logits, strict=True))
    }
    return AttributeClassifier(
        attributes, dict(values), net, accuracy, {"train": len(train), "test": n_test}, width
    )


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
        + ", ".join(f"{a} {acc:.3f}" for a, acc in classifier.accuracy.items())
    )
    return classifier
