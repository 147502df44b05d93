"""Synthetic concept worlds: one coloured shape on white, as img2dataset WebDataset shards.

The paper's Synthetic benchmark (docs/method.md section 6) is a shape x colour world with one
combination held out of training; a model that draws the held-out combination anyway has
composed "red" and "triangle", and attribution asks which training images taught it which
attribute. Two worlds:

- `paper`: {triangle, circle} x {red, blue}, (red, triangle) held out;
- `wide`:  {triangle, circle, square, cross} x {red, blue, green, yellow}, the diagonal
  (red, triangle), (blue, square), (green, cross), (yellow, circle) held out, so every shape
  and every colour still appears in training with three partners.

A third, `icons` (a white heart, moon or star on a blue, orange or green background, the
diagonal held out, JPEG, "a {shape} icon on {colour}"), lives in `ctrak.toy.icons`; the
functions here dispatch to it.

Image i of a split is combo i mod (number of combos of that split) - so any prefix is
balanced - with position and size drawn from `derive_seed(seed, "synthetic", world, split,
i)`. The shards of a world: `ctrak.toy.world_shards`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from ctrak.errors import ConfigError
from ctrak.seeds import derive_seed

World = Literal["paper", "wide", "icons"]
Split = Literal["train", "heldout", "all"]

GENERATOR_VERSION = "ctrak-synthetic/1"
WHITE = (255, 255, 255)
OUTLINE = (40, 40, 40)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
    "yellow": (235, 200, 40),
}
WORLDS: dict[str, dict[str, tuple]] = {
    "paper": {
        "shapes": ("triangle", "circle"),
        "colours": ("red", "blue"),
        "heldout": (("triangle", "red"),),
    },
    "wide": {
        "shapes": ("triangle", "circle", "square", "cross"),
        "colours": ("red", "blue", "green", "yellow"),
        "heldout": (
            ("triangle", "red"),
            ("square", "blue"),
            ("cross", "green"),
            ("circle", "yellow"),
        ),
    },
}
SIZE_RANGE = (0.22, 0.36)  # shape radius as a fraction of the image side
MAX_SHARD_SIZE = 10_000  # the key holds a 4-digit index


@dataclass(frozen=True)
class Combo:
    """One (shape, colour) combination of a world and whether training leaves it out."""

    shape: str
    colour: str
    heldout: bool
    template: str = "a {colour} {shape}"

    @property
    def caption(self) -> str:
        return self.template.format(shape=self.shape, colour=self.colour)


def caption(shape: str, colour: str) -> str:
    """The prompt of a combination: "a {colour} {shape}"."""
    return f"a {colour} {shape}"


def _world(world: str) -> dict[str, tuple]:
    from ctrak.toy.icons import ICON_WORLDS

    if world in ICON_WORLDS:
        return ICON_WORLDS[world]
    if world not in WORLDS:
        raise ConfigError(f"world={world!r} is not one of {[*WORLDS, *ICON_WORLDS]}")
    return WORLDS[world]


def world_names() -> list[str]:
    """Every built-in world: paper, wide and the icon worlds."""
    from ctrak.toy.icons import ICON_WORLDS

    return [*WORLDS, *ICON_WORLDS]


def image_format(world: World) -> str:
    """The image member of the world's shards: "png", or "jpg" for the icon worlds."""
    from ctrak.toy.icons import ICON_WORLDS

    return "jpg" if world in ICON_WORLDS else "png"


def world_combos(world: World) -> list[Combo]:
    """Every combination of the world, shapes major, with its held-out flag."""
    from ctrak.toy.icons import ICON_WORLDS, TEMPLATE

    spec = _world(world)
    heldout = set(spec["heldout"])
    template = TEMPLATE if world in ICON_WORLDS else Combo.template
    return [
        Combo(shape, colour, (shape, colour) in heldout, template)
        for shape in spec["shapes"]
        for colour in spec["colours"]
    ]


def split_combos(world: World, split: Split) -> list[Combo]:
    """The combinations a split draws from: train = not held out, heldout = held out, all."""
    combos = world_combos(world)
    if split == "train":
        return [c for c in combos if not c.heldout]
    if split == "heldout":
        return [c for c in combos if c.heldout]
    if split == "all":
        return combos
    raise ConfigError(f"split={split!r} is not one of ['train', 'heldout', 'all']")


# ---- rendering -----------------------------------------------------------------------------
def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape of radius r centred at (cx, cy); None for the circle."""
    if shape == "triangle":  # equilateral, apex up, circumradius r, centred on its bbox
        cy = cy + r / 4
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.deg2rad([-90.0, 30.0, 150.0])]
    if shape == "square":
        h = 0.75 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "cross":
        a, b = 0.9 * r, 0.32 * r
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
        pts += [(-x, -y) for x, y in pts]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "circle":
        return None
    raise ConfigError(f"shape={shape!r} is not one of triangle, circle, square, cross")


def render(
    shape: str, colour: str, center: tuple[float, float], size: float, image_size: int
) -> np.ndarray:
    """One image: a `colour` `shape` of radius `size` px at `center` (x, y) px on white.

    Returns (image_size, image_size, 3) uint8; filled with PALETTE[colour], 1 px dark outline,
    no anti-aliasing.
    """
    if colour not in PALETTE:
        raise ConfigError(f"colour={colour!r} is not one of {list(PALETTE)}")
    image = Image.new("RGB", (image_size, image_size), WHITE)
    draw = ImageDraw.Draw(image)
    cx, cy = center
    poly = _outline(shape, cx, cy, size)
    if poly is None:
        r = 0.8 * size
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=PALETTE[colour], outline=OUTLINE)
    else:
        draw.polygon(poly, fill=PALETTE[colour], outline=OUTLINE)
    return np.asarray(image, dtype=np.uint8)


def sample_geometry(image_size: int, seed: int) -> tuple[float, float, float]:
    """(cx, cy, size) in px: size uniform in SIZE_RANGE * image_size, the shape inside."""
    rng = np.random.default_rng(seed)
    size = float(rng.uniform(*SIZE_RANGE)) * image_size
    lo, hi = size + 1.0, image_size - 1.0 - size
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    return round(cx, 3), round(cy, 3), round(size, 3)


def sample_row(
    world: World, split: Split, index: int, image_size: int, seed: int
) -> tuple[np.ndarray, dict]:
    """Image `index` of a split -> ((H, W, 3) uint8, labels). Combo = index mod #combos."""
    from ctrak.toy.icons import ICON_WORLDS, render_icon, sample_icon_geometry

    combos = split_combos(world, split)
    combo = combos[index % len(combos)]
    icon = world in ICON_WORLDS
    geometry = sample_icon_geometry if icon else sample_geometry
    cx, cy, size = geometry(image_size, derive_seed(seed, "synthetic", world, split, index))
    labels = {
        "shape": combo.shape,
        "colour": combo.colour,
        "heldout": combo.heldout,
        "cx": cx,
        "cy": cy,
        "size": size,
    }
    draw = render_icon if icon else render
    return draw(combo.shape, combo.colour, (cx, cy), size, image_size), labels


# ---- classification (for filtering generated images) --------------------------------------
def _template(shape: str, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of `shape` stretched to fill the box."""
    big = 64
    mask = render(shape, "red", (big / 2, big / 2), big * 0.45, big).min(axis=2) < 250
    ys, xs = np.nonzero(mask)
    crop = Image.fromarray(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    return np.asarray(crop.resize((width, height), Image.NEAREST), dtype=bool)


def _foreground(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels far from the background colour (median of the border), minus
    speckles (pixels with fewer than 2 foreground pixels among their 8 neighbours)."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return despeckle(np.abs(rgb - np.median(border, axis=0)).max(axis=2) > 70)


def template_iou(mask, rows, cols, shapes, template) -> tuple[np.ndarray, dict[str, float]]:
    """The foreground's bounding box (rows, cols: its occupied indices) of `mask` (H, W) and,
    per shape, the IoU of `template(shape, height, width)` stretched to that box."""
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = mask[y0:y1, x0:x1]
    iou = {}
    for shape in shapes:
        tmpl = template(shape, y1 - y0, x1 - x0)
        iou[shape] = float((tmpl & box).sum() / max((tmpl | box).sum(), 1))
    return box, iou


def despeckle(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> the pixels of `mask` with at least 2 of their 8 neighbours in it."""
    padded = np.pad(mask, 1).astype(int)
    height, width = mask.shape
    neighbours = sum(
        padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
        if dy or dx
    )
    return mask & (neighbours >= 2)


def classify(image: np.ndarray, world: World) -> tuple[str | None, str | None]:
    """(shape, colour) of an image of the world, or None where it shows no clear answer.

    image (H, W, 3) uint8. Foreground: pixels far from the border's median colour, speckles
    removed. Colour: nearest palette colour to the median of saturated foreground pixels.
    Shape: a triangle when the top third is much narrower than the bottom third, else the
    world's shape whose template, stretched to the foreground's bounding box, overlaps it
    best (IoU >= 0.6). A filter for generated query images (docs/method.md section 6).
    """
    from ctrak.toy.icons import ICON_WORLDS, classify_icon

    if world in ICON_WORLDS:  # a white pictogram on a coloured background
        return classify_icon(image, world)
    spec = _world(world)
    rgb = image.astype(np.float32)
    mask = _foreground(rgb)  # (H, W)
    rows, cols = np.nonzero(mask.sum(axis=1) >= 2)[0], np.nonzero(mask.sum(axis=0) >= 2)[0]
    if mask.sum() < 6 or len(rows) < 3 or len(cols) < 3:
        return None, None
    saturated = mask & (rgb.max(axis=2) - rgb.min(axis=2) > 60)  # fill, not outline
    colour = None
    if saturated.sum() >= 3:
        median = np.median(rgb[saturated], axis=0)
        dist = {c: float(np.linalg.norm(median - PALETTE[c])) for c in spec["colours"]}
        best = min(dist, key=dist.get)
        colour = best if dist[best] < 90 else None
    box, iou = template_iou(mask, rows, cols, spec["shapes"], _template)
    # the apex-up triangle is the one shape much narrower in its top third than its bottom
    # third (ratio ~0.2; 1 for the others): IoU alone confuses small pixelated triangles
    third = max(box.shape[0] // 3, 1)
    taper = box[:third].sum() / max(box[-third:].sum(), 1)
    if "triangle" in iou:
        if taper < 0.6 and iou["triangle"] >= 0.5:
            return "triangle", colour
        iou.pop("triangle")
    best_shape = max(iou, key=iou.get)
    return (best_shape if iou[best_shape] >= 0.6 else None), colour
