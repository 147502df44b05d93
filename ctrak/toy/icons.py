"""The third built-in world, `icons`: a white pictogram on a coloured background, as JPEG.

Unlike `paper` and `wide` (a flat-coloured geometric shape on white, PNG, "a {colour}
{shape}"), an image of `icons` is a pictogram - a heart, a crescent moon or a star - drawn in white
and anti-aliased (rendered at 4x and box-downsampled) on a background of one colour; the
caption puts the object first and the colour after it: "a {shape} icon on {colour}". Its
shards hold JPEG (img2dataset's default, quality 95). The attributes keep the label keys
of the other worlds ("shape" = the pictogram, "colour" = the background), so every
consumer of the built-in worlds (generate_world, read_samples, classify, ctrak eval)
reads it unchanged.

- `icons`: {heart, moon, star} x {blue, orange, green}, the diagonal (heart, orange),
  (moon, green), (star, blue) held out of training, so every pictogram and every background
  still appears with two partners (as `wide` holds out its diagonal).

Image i of a split is combo i mod (number of combos of that split), as in `worlds`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from ctrak.errors import ConfigError
from ctrak.toy.worlds import despeckle, template_iou

ICON_WORLDS: dict[str, dict[str, tuple]] = {
    "icons": {
        "shapes": ("heart", "moon", "star"),
        "colours": ("blue", "orange", "green"),
        "heldout": (("heart", "orange"), ("moon", "green"), ("star", "blue")),
    },
}
TEMPLATE = "a {shape} icon on {colour}"
BACKGROUND: dict[str, tuple[int, int, int]] = {
    "blue": (40, 80, 220),
    "orange": (235, 130, 30),
    "green": (40, 150, 60),
}
INK = (250, 250, 250)
SIZE_RANGE = (0.26, 0.36)  # pictogram half-width as a fraction of the image side
SUPERSAMPLE = 4
JPEG_QUALITY = 95  # img2dataset's default encode_quality
MIN_IOU = {"heart": 0.68, "moon": 0.5, "star": 0.63}  # classify_icon's bar per pictogram


def icon_caption(shape: str, colour: str) -> str:
    """The prompt of a combination: "a {shape} icon on {colour}"."""
    return TEMPLATE.format(shape=shape, colour=colour)


def _heart(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a heart of half-width r centred on its bounding box at (cx, cy)."""
    t = np.linspace(0.0, 2 * np.pi, 120, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    # 1. centre the curve's bounding box on the origin, scale its half-width to r
    x, y = x - (x.max() + x.min()) / 2, y - (y.max() + y.min()) / 2
    scale = r / x.max()
    return [(cx + scale * a, cy + scale * b) for a, b in zip(x, y, strict=True)]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of a five-pointed star (one point up, inner radius 0.5 r) of outer radius r."""
    angle = -np.pi / 2 + np.arange(10) * np.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
    return [(cx + a * np.cos(b), cy + a * np.sin(b)) for a, b in zip(radius, angle, strict=True)]


_POLYGONS = {"heart": _heart, "star": _star}


def render_icon(
    shape: str, colour: str, center: tuple[float, float], size: float, image_size: int
) -> np.ndarray:
    """One image: a white `shape` of half-width `size` px at `center` (x, y) px on a
    `colour` background. Returns (image_size, image_size, 3) uint8 (anti-aliased)."""
    if colour not in BACKGROUND:
        raise ConfigError(f"colour={colour!r} is not one of {list(BACKGROUND)}")
    k = SUPERSAMPLE
    big = Image.new("RGB", (image_size * k, image_size * k), BACKGROUND[colour])
    draw = ImageDraw.Draw(big)
    cx, cy, r = center[0] * k, center[1] * k, size * k
    if shape in _POLYGONS:
        draw.polygon(_POLYGONS[shape](cx, cy, r), fill=INK)
    elif shape == "moon":
        # 2. a crescent: a disc minus a disc shifted right and up, opening to the right
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=INK)
        ox, oy, r2 = cx + 0.55 * r, cy - 0.2 * r, 0.82 * r
        draw.ellipse((ox - r2, oy - r2, ox + r2, oy + r2), fill=BACKGROUND[colour])
    else:
        raise ConfigError(f"shape={shape!r} is not one of heart, moon, star")
    small = big.resize((image_size, image_size), Image.BOX)
    return np.asarray(small, dtype=np.uint8)


def sample_icon_geometry(image_size: int, seed: int) -> tuple[float, float, float]:
    """(cx, cy, size) in px: size uniform in SIZE_RANGE * image_size, the icon at least 1.5 px
    inside the border (so the border is background only)."""
    rng = np.random.default_rng(seed)
    size = float(rng.uniform(*SIZE_RANGE)) * image_size
    lo, hi = size + 1.5, image_size - 1.5 - size
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    return round(cx, 3), round(cy, 3), round(size, 3)


def jpeg(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> JPEG bytes (quality 95, deterministic for equal input)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---- classification (for filtering generated images) --------------------------------------
def _icon_template(shape: str, height: int, width: int) -> np.ndarray:
    """(height, width) bool mask of `shape` stretched to fill the box."""
    big = 64
    image = render_icon(shape, "blue", (big / 2, big / 2), big * 0.4, big)
    mask = image.min(axis=2) > min(BACKGROUND["blue"]) + 60  # as classify_icon reads ink
    ys, xs = np.nonzero(mask)
    crop = Image.fromarray(mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    return np.asarray(crop.resize((width, height), Image.NEAREST), dtype=bool)


def classify_icon(image: np.ndarray, world: str) -> tuple[str | None, str | None]:
    """(shape, colour) of an image of an icon world, or None where it shows no clear answer.

    image (H, W, 3) uint8. Colour: the palette colour nearest the median of the border
    (within 90). Foreground: pixels brighter than the background by > 60 in their minimum
    channel (the white ink; every background has one channel <= 80), speckles removed.
    Shape: the world's pictogram whose template, stretched to the foreground's bounding box,
    overlaps it best, when that IoU reaches MIN_IOU and beats the runner-up by 0.05. The
    heart's bar (0.68) is above what a filled square reaches as a heart (0.66 at 24 px); the
    crescent's thin horns lose pixels at 20-24 px in JPEG, so the moon's bar is 0.5 (its
    renders: >= 0.55 at 20 px, the other templates on them <= 0.49); the star's bar 0.63 is
    above a filled disc's or ellipse's star IoU (<= 0.62 at 24 px) and below its renders'
    (>= 0.64 at 24 px). On 450 JPEG renders at 24 px it reads 448 right and 2 stars as None.
    """
    spec = ICON_WORLDS[world]
    rgb = image.astype(np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    dist = {c: float(np.linalg.norm(background - BACKGROUND[c])) for c in spec["colours"]}
    best = min(dist, key=dist.get)
    colour = best if dist[best] < 90 else None
    # 1. the ink: bright in every channel, far above the background's darkest channel
    mask = despeckle(rgb.min(axis=2) > background.min() + 60)
    rows, cols = np.nonzero(mask.sum(axis=1) >= 2)[0], np.nonzero(mask.sum(axis=0) >= 2)[0]
    if mask.sum() < 8 or len(rows) < 4 or len(cols) < 4:
        return None, colour
    # 2. template IoU inside the bounding box
    _, iou = template_iou(mask, rows, cols, spec["shapes"], _icon_template)
    ranked = sorted(iou, key=iou.get, reverse=True)
    top, second = iou[ranked[0]], iou[ranked[1]] if len(ranked) > 1 else 0.0
    ok = top >= MIN_IOU[ranked[0]] and top - second >= 0.05
    return (ranked[0] if ok else None), colour
