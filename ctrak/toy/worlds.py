"""Synthetic concept worlds: one coloured shape on white, as img2dataset WebDataset shards.

The paper's Synthetic benchmark (METHOD.md section 5) is a shape x colour world with one
combination held out of training; a model that draws the held-out combination anyway has
composed "red" and "triangle", and attribution asks which training images taught it which
attribute. Two worlds:

- `paper`: {triangle, circle} x {red, blue}, (red, triangle) held out;
- `wide`:  {triangle, circle, square, cross} x {red, blue, green, yellow}, the diagonal
  (red, triangle), (blue, square), (green, cross), (yellow, circle) held out, so every shape
  and every colour still appears in training with three partners.

Everything is a pure function of (world, split, num_images, image_size, seed): image i of a
split is combo i mod (number of combos of that split) - so any prefix is balanced - with
position and size drawn from `derive_seed(seed, "synthetic", world, split, i)`. Shards follow
img2dataset: `00000.tar` with `{key}.png|txt|json`, `00000.parquet` with the same rows, and
`00000_stats.json`; key = 5-digit shard id + 4-digit index. `spec.json` at the root records
the arguments, so the exact set can be regenerated; a rerun skips shards whose stats exist.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from ctrak.errors import ConfigError
from ctrak.seeds import derive_seed

World = Literal["paper", "wide"]
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

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour)


def caption(shape: str, colour: str) -> str:
    """The prompt of a combination: "a {colour} {shape}"."""
    return f"a {colour} {shape}"


def _world(world: str) -> dict[str, tuple]:
    if world not in WORLDS:
        raise ConfigError(f"world={world!r} is not one of {list(WORLDS)}")
    return WORLDS[world]


def world_combos(world: World) -> list[Combo]:
    """Every combination of the world, shapes major, with its held-out flag."""
    spec = _world(world)
    heldout = set(spec["heldout"])
    return [
        Combo(shape, colour, (shape, colour) in heldout)
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
    combos = split_combos(world, split)
    combo = combos[index % len(combos)]
    cx, cy, size = sample_geometry(image_size, derive_seed(seed, "synthetic", world, split, index))
    labels = {
        "shape": combo.shape,
        "colour": combo.colour,
        "heldout": combo.heldout,
        "cx": cx,
        "cy": cy,
        "size": size,
    }
    return render(combo.shape, combo.colour, (cx, cy), size, image_size), labels


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
    mask = np.abs(rgb - np.median(border, axis=0)).max(axis=2) > 70
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
    best (IoU >= 0.6). A filter for generated query images (METHOD.md section 7).
    """
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
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = mask[y0:y1, x0:x1]
    iou = {}
    for shape in spec["shapes"]:
        tmpl = _template(shape, y1 - y0, x1 - x0)
        iou[shape] = float((tmpl & box).sum() / max((tmpl | box).sum(), 1))
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


# ---- shards --------------------------------------------------------------------------------
def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of (name, data) with fixed metadata, so equal inputs give equal bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int64()),
            ("height", pa.int64()),
            ("shape", pa.string()),
            ("colour", pa.string()),
            ("heldout", pa.bool_()),
            ("cx", pa.float64()),
            ("cy", pa.float64()),
            ("size", pa.float64()),
            ("json", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _write_atomic(fs, path: str, data: bytes) -> None:
    """Write bytes to `path`: temp name + rename on a local disk, one PUT elsewhere."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def dataset_spec(
    world: World, *, num_images: int, image_size: int, shard_size: int, seed: int, split: Split
) -> dict:
    """The arguments that fix a generated set (written as spec.json)."""
    return {
        "generator": GENERATOR_VERSION,
        "world": world,
        "split": split,
        "num_images": int(num_images),
        "image_size": int(image_size),
        "shard_size": int(shard_size),
        "seed": int(seed),
    }


def generate_world(
    world: World,
    out_uri: str,
    *,
    num_images: int,
    image_size: int,
    shard_size: int = 1000,
    seed: int = 0,
    split: Split = "train",
    storage_options: dict | None = None,
) -> list[str]:
    """Write `num_images` images of a split of `world` as shards under `out_uri`.

    `out_uri` is a local path or an fsspec URI (s3://bucket/prefix with storage_options).
    Returns the URIs of the tar shards in order. Raises ConfigError on bad arguments, or when
    `out_uri` already holds a set made with other arguments.
    """
    import fsspec

    split_combos(world, split)  # validates world and split
    if num_images < 1:
        raise ConfigError(f"num_images={num_images} must be >= 1")
    if image_size < 8:
        raise ConfigError(f"image_size={image_size} must be >= 8 for shapes to be drawable")
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise ConfigError(f"shard_size={shard_size} must be in [1, {MAX_SHARD_SIZE}]")
    fs, root = fsspec.core.url_to_fs(out_uri, **(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    spec = dataset_spec(
        world,
        num_images=num_images,
        image_size=image_size,
        shard_size=shard_size,
        seed=seed,
        split=split,
    )
    spec_path = f"{root}/spec.json"
    if fs.exists(spec_path):
        old = json.loads(fs.cat_file(spec_path))
        if old != spec:
            raise ConfigError(
                f"{out_uri} already holds a set made with {old}; asked for {spec}. "
                "Write to a new location or delete the old set."
            )
    else:
        _write_atomic(fs, spec_path, (json.dumps(spec, indent=2) + "\n").encode())

    base = out_uri.rstrip("/")
    uris = []
    for shard in range((num_images + shard_size - 1) // shard_size):
        name = f"{shard:05d}"
        uris.append(f"{base}/{name}.tar")
        if fs.exists(f"{root}/{name}_stats.json"):
            continue  # finished by an earlier run
        members, rows = [], []
        for j in range(min(shard_size, num_images - shard * shard_size)):
            image, labels = sample_row(world, split, shard * shard_size + j, image_size, seed)
            key = f"{shard:05d}{j:04d}"
            text = caption(labels["shape"], labels["colour"])
            meta = {"key": key, "caption": text, **labels}
            meta_json = json.dumps(meta, sort_keys=True)
            members += [
                (f"{key}.png", _png(image)),
                (f"{key}.txt", text.encode()),
                (f"{key}.json", meta_json.encode()),
            ]
            rows.append(
                {
                    "key": key,
                    "caption": text,
                    "status": "success",
                    "error_message": None,
                    "width": image_size,
                    "height": image_size,
                    **labels,
                    "json": meta_json,
                }
            )
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0}
        # 1. data, 2. parquet, 3. stats last: the stats file marks the shard complete
        _write_atomic(fs, f"{root}/{name}.tar", _tar(members))
        _write_atomic(fs, f"{root}/{name}.parquet", _parquet(rows))
        _write_atomic(fs, f"{root}/{name}_stats.json", (json.dumps(stats) + "\n").encode())
    return uris


def read_samples(uri: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Rows of every tar shard under `uri` (a folder) or of one `.tar`, in key order:
    {"key", "image": (H, W, 3) uint8, "caption", "labels": dict}."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    paths = [root] if root.endswith(".tar") else sorted(fs.glob(f"{root.rstrip('/')}/*.tar"))
    if not paths:
        raise ConfigError(f"no .tar shards under {uri}; generate them with generate_world")
    for path in paths:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            groups: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                if member.isfile():
                    key, _, ext = member.name.rpartition(".")
                    groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key in sorted(groups):
            parts = groups[key]
            image = np.asarray(Image.open(io.BytesIO(parts["png"])).convert("RGB"))
            yield {
                "key": key,
                "image": image,
                "caption": parts["txt"].decode(),
                "labels": json.loads(parts["json"]),
            }


def main(argv: list[str] | None = None) -> int:
    """`python -m ctrak.toy.worlds WORLD OUT --num-images N --image-size S --seed K`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ctrak.toy.worlds", description=__doc__)
    parser.add_argument("world", choices=sorted(WORLDS))
    parser.add_argument("out", help="local folder or fsspec URI")
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=["train", "heldout", "all"], default="train")
    args = parser.parse_args(argv)
    uris = generate_world(
        args.world,
        args.out,
        num_images=args.num_images,
        image_size=args.image_size,
        shard_size=args.shard_size,
        seed=args.seed,
        split=args.split,
    )
    print(json.dumps({"shards": uris}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
