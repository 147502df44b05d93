"""read_samples on img2dataset shards of every image format featurize reads (JPEG, PNG, WebP),
and the named error for a sample featurize would reject as unreadable."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ctrak.errors import SampleDecodeError
from ctrak.toy.world_shards import _tar, read_samples
from pipeline.shards import decode_image


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((16, 16, 3), (40, 80, 220), np.uint8)
    y, x = rng.integers(2, 8, size=2)
    image[y : y + 6, x : x + 6] = 255
    return image


def _shard(tmp_path, ext: str, fmt: str, extra: list[tuple[str, bytes]] = ()) -> list[np.ndarray]:
    images, members = [_image(i) for i in range(3)], []
    for i, image in enumerate(images):
        key = f"00000{i:04d}"
        members += [
            (f"{key}.{ext}", _encoded(image, fmt)),
            (f"{key}.txt", f"caption {i}".encode()),
            (f"{key}.json", json.dumps({"key": key, "label": i}).encode()),
        ]
    (tmp_path / "00000.tar").write_bytes(_tar([*members, *extra]))
    return images


@pytest.mark.parametrize(("ext", "fmt"), [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_read_samples_decodes_as_featurize_does(tmp_path, ext, fmt):
    images = _shard(tmp_path, ext, fmt)
    rows = list(read_samples(str(tmp_path)))
    assert [r["key"] for r in rows] == ["000000000", "000000001", "000000002"]
    assert [r["labels"]["label"] for r in rows] == [0, 1, 2]
    for row, image in zip(rows, images, strict=True):
        data = _encoded(image, fmt)
        # the same pixels as the featurize path, and close to the original (lossy formats)
        np.testing.assert_array_equal(row["image"], decode_image(data, 16))
        error = np.abs(row["image"].astype(int) - image.astype(int)).mean()
        assert error == 0 if fmt == "PNG" else error < 12


def test_unreadable_sample_gets_featurize_reason(tmp_path):
    jpeg = _encoded(_image(9), "JPEG")
    _shard(tmp_path, "jpg", "JPEG", [("000000003.jpg", jpeg[: len(jpeg) // 3])])
    with pytest.raises(SampleDecodeError, match=r"'000000003'.*undecodable image"):
        list(read_samples(str(tmp_path)))
    with pytest.raises(ValueError, match="undecodable image"):
        decode_image(jpeg[: len(jpeg) // 3], 16)  # featurize's reason for the same bytes


def test_sample_without_image_is_named(tmp_path):
    _shard(tmp_path, "png", "PNG", [("000000003.txt", b"no image")])
    with pytest.raises(SampleDecodeError, match=r"'000000003'.*no image member"):
        list(read_samples(str(tmp_path)))
