"""A synthetic world as img2dataset WebDataset shards, and reading them back.

Everything is a pure function of (world, split, num_images, image_size, seed): image i of a
split is combo i mod (number of combos of that split) - so any prefix is balanced - with
position and size drawn from `derive_seed(seed, "synthetic", world, split, i)`. Shards follow
img2dataset: `00000.tar` with `{key}.png|txt|json` (`.jpg` for the icon worlds),
`00000.parquet` with the same rows, and `00000_stats.json`; key = 5-digit shard id + 4-digit
index. `spec.json` at the root records the arguments, so the exact set can be regenerated;
a rerun skips shards whose stats exist.

    python -m ctrak.toy.world_shards WORLD OUT --num-images N --image-size S --seed K
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from ctrak.errors import ConfigError, SampleDecodeError
from ctrak.toy.icons import jpeg
from ctrak.toy.worlds import (
    GENERATOR_VERSION,
    MAX_SHARD_SIZE,
    Split,
    World,
    image_format,
    sample_row,
    split_combos,
    world_names,
)


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

    combos = {(c.shape, c.colour): c for c in split_combos(world, split)}  # validates both
    ext = image_format(world)
    encode = _png if ext == "png" else jpeg
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
            text = combos[labels["shape"], labels["colour"]].caption
            meta = {"key": key, "caption": text, **labels}
            meta_json = json.dumps(meta, sort_keys=True)
            members += [
                (f"{key}.{ext}", encode(image)),
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


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # as pipeline.shards reads them


def decode_sample_image(parts: dict[str, bytes]) -> np.ndarray:
    """{extension: bytes} of one sample -> its image (H, W, 3) uint8, decoded as the featurize
    path does (pipeline.shards.decode_image: JPEG/PNG/WebP, EXIF orientation applied, RGB only,
    never converted). Raises ValueError with featurize's reject reason."""
    from PIL import ImageOps, UnidentifiedImageError

    found = [ext for ext in IMAGE_EXTENSIONS if ext in parts]
    if not found:
        raise ValueError(f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})")
    if len(found) > 1:
        raise ValueError(f"several image members ({', '.join(found)})")
    try:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(parts[found[0]])))
        if image.mode != "RGB":
            raise ValueError(f"image mode is {image.mode}, expected RGB")
        return np.asarray(image, dtype=np.uint8).copy()
    except UnidentifiedImageError:
        raise ValueError("undecodable image: not a format Pillow identifies") from None
    except (OSError, Image.DecompressionBombError) as err:  # truncated, corrupt, bomb
        raise ValueError(f"undecodable image: {err}") from None


def read_samples(uri: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Rows of every tar shard under `uri` (a folder) or of one `.tar`, in key order:
    {"key", "image": (H, W, 3) uint8, "caption", "labels": dict}. Images may be JPEG, PNG or
    WebP; a sample featurize would reject as unreadable raises SampleDecodeError naming it."""
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
                    groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for key in sorted(groups):
            parts = groups[key]
            try:
                image = decode_sample_image(parts)
            except ValueError as err:
                raise SampleDecodeError(
                    f"sample {key!r} of {path}: {err} (featurize rejects it too); re-encode or "
                    "remove that sample from the shard"
                ) from None
            if "txt" not in parts:
                raise SampleDecodeError(f"sample {key!r} of {path}: missing caption (.txt member)")
            yield {
                "key": key,
                "image": image,
                "caption": parts["txt"].decode(),
                "labels": json.loads(parts["json"]) if "json" in parts else {},
            }


def main(argv: list[str] | None = None) -> int:
    """`python -m ctrak.toy.world_shards WORLD OUT --num-images N --image-size S --seed K`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ctrak.toy.world_shards", description=__doc__)
    parser.add_argument("world", choices=sorted(world_names()))
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
