"""The attribution report: per query, each method's top-k training images, as HTML and PNG.

    report.html  one self-contained file: images inline as base64 PNG data URIs, inline CSS,
                 no scripts, no links; every text escaped
    report.png   the same grids drawn with PIL: query image on the left, one row per method

A `Section` is one query (prompt c, target concept, negative c-, query image) with one
`MethodHits` per method: its hits in rank order with score I(z, q) = x_q^T phi_z, caption,
labels and image. A hit is marked relevant (green frame, check) when one of its labels equals
the target concept, not relevant (grey frame, faded) when it has that label with another value,
and left unmarked when nothing tells (`relevance`). Rendering is pure; `write_query_report`
is the `ctrak query --report` glue (hit images via `pipeline.images.hit_images`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

THUMB = 96  # px, display size of a hit image (HTML and PNG)
QUERY = 160  # px, display size of the query image
CELL = THUMB + 22  # px, PNG column of one hit
MAX_EMBED = 2 * THUMB  # larger images are shrunk to this before embedding
GREEN, GREY = (46, 160, 67), (190, 190, 190)
HIDDEN_LABELS = {"key", "caption", "url", "status", "error_message"}


@dataclass(frozen=True)
class ReportHit:
    """One retrieved training image; `image` (H, W, 3) uint8, `relevant` True/False/None."""

    rank: int
    key: str
    score: float
    caption: str = ""
    labels: Mapping[str, object] | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    relevant: bool | None = None
    shard: str = ""


@dataclass(frozen=True)
class MethodHits:
    """One method's top-k for a query; `precision` = P@k, shown when given."""

    method: str
    hits: Sequence[ReportHit]
    precision: float | None = None


@dataclass(frozen=True)
class Section:
    """One query: prompt, concept, negative, query image (H, W, 3) uint8, methods."""

    prompt: str
    methods: Sequence[MethodHits]
    concept: str | None = None
    negative: str | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    note: str = ""


# ---- labels and relevance --------------------------------------------------------------------
def same_value(value: object, concept: str) -> bool:
    return isinstance(value, str) and value.strip().lower() == concept.strip().lower()


def relevance(concept: str | None, metadata: Sequence[Mapping | None]) -> list[bool | None]:
    """Per hit: True when a label equals the concept (e.g. {"shape": "triangle"} for
    "triangle"); False when the hit has a label that equals the concept in another hit but not
    in this one (the concept's attribute, another value); None otherwise."""
    if not concept:
        return [None] * len(metadata)
    attributes = {k for m in metadata if m for k, v in m.items() if same_value(v, concept)}
    marks: list[bool | None] = []
    for m in metadata:
        if m and any(same_value(v, concept) for v in m.values()):
            marks.append(True)
        elif m and attributes & set(m):
            marks.append(False)
        else:
            marks.append(None)
    return marks


def precision_at_k(marks: Sequence[bool | None]) -> float | None:
    """Fraction of relevant hits; None unless every hit is marked True or False."""
    if not marks or any(m is None for m in marks):
        return None
    return sum(bool(m) for m in marks) / len(marks)


def display_labels(metadata: Mapping | None, limit: int = 4) -> dict[str, str]:
    """The short labels worth a chip, {name: text}: str/int values up to 32 characters and
    true flags (text ""); no floats, no key/caption/url; at most `limit`."""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if k in HIDDEN_LABELS or isinstance(v, float) or not isinstance(v, str | int | bool):
            continue
        if isinstance(v, bool) and not v:
            continue
        text = "" if isinstance(v, bool) else str(v)
        if len(text) <= 32 and len(out) < limit:
            out[str(k)] = text
    return out


# ---- images ----------------------------------------------------------------------------------
def _picture(image: np.ndarray) -> Image.Image:
    """(H, W, 3|4) or (H, W) uint8 -> an RGB PIL image; ValueError naming any other shape."""
    array = np.asarray(image)
    channels = array.shape[2] if array.ndim == 3 else 1
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or channels not in (1, 3, 4):
        raise ValueError(f"report images are (H, W, 3) uint8, got {array.shape} {array.dtype}")
    if channels == 1:
        array = np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]))


def fit_image(image: np.ndarray, side: int) -> Image.Image:
    """(H, W, 3) uint8 -> a PIL image fitting a side x side box: nearest-neighbour when
    enlarging (pixels stay crisp), Lanczos when shrinking."""
    picture = _picture(image)
    scale = side / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS)


def data_uri(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> data:image/png;base64,..., shrunk to MAX_EMBED px when larger."""
    picture = _picture(image)
    if max(picture.size) > MAX_EMBED:
        picture = fit_image(image, MAX_EMBED)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
