"""The third built-in world, `icons`: deterministic JPEG shards, labels that match the pixels,
the held-out combination absent from training, and captions the trainer can tokenize."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ctrak.toy.icons import BACKGROUND, ICON_WORLDS, icon_caption
from ctrak.toy.train import _attribute_drops, attribute_words
from ctrak.toy.world_shards import main, read_samples
from ctrak.toy.worlds import classify, sample_row, split_combos, world_combos


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_icon_shards_are_jpeg_deterministic_and_exclude_heldout(tmp_path, capsys):
    args = ["icons", "--num-images", "12", "--image-size", "24", "--seed", "3"]
    for out in ("a", "b"):
        assert main([args[0], str(tmp_path / out), *args[1:]]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["shards"][0].endswith("00000.tar")
    first, second = _members(tmp_path / "a/00000.tar"), _members(tmp_path / "b/00000.tar")
    assert first == second  # byte for byte
    images = [name for name in first if not name.endswith((".txt", ".json"))]
    assert len(images) == 12 and all(name.endswith(".jpg") for name in images)
    assert {Image.open(io.BytesIO(first[name])).format for name in images} == {"JPEG"}
    rows = list(read_samples(str(tmp_path / "a")))
    heldout = {(c.shape, c.colour) for c in world_combos("icons") if c.heldout}
    assert heldout == {("heart", "orange"), ("moon", "green"), ("star", "blue")}
    seen = [(r["labels"]["shape"], r["labels"]["colour"]) for r in rows]
    assert not set(seen) & heldout and not any(r["labels"]["heldout"] for r in rows)
    assert sorted(set(seen)) == sorted((c.shape, c.colour) for c in split_combos("icons", "train"))
    for row in rows:  # the caption template, attribute words whole, labels in the .json
        assert row["caption"] == f"a {row['labels']['shape']} icon on {row['labels']['colour']}"
        assert classify(row["image"], "icons") == (row["labels"]["shape"], row["labels"]["colour"])


def test_icon_labels_match_pixels():
    for index in range(40):
        image, labels = sample_row("icons", "all", index, 24, seed=11)
        again, _ = sample_row("icons", "all", index, 24, seed=11)
        np.testing.assert_array_equal(image, again)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == BACKGROUND[labels["colour"]]).all()  # background only at the edge
        ink = (image.min(axis=2) > 200).mean()
        assert 0.08 < ink < 0.5  # the pictogram is big enough to read
        assert classify(image, "icons") == (labels["shape"], labels["colour"])


@pytest.mark.parametrize("draw", ["blank", "square", "disc"])
def test_icon_classifier_refuses_other_pictures(draw):
    image = Image.new("RGB", (24, 24), BACKGROUND["blue"])
    box = (5, 5, 18, 18)
    if draw == "square":
        ImageDraw.Draw(image).rectangle(box, fill=(250, 250, 250))
    elif draw == "disc":
        ImageDraw.Draw(image).ellipse(box, fill=(250, 250, 250))
    assert classify(np.asarray(image), "icons") == (None, "blue")
    grey = np.full((24, 24, 3), 128, np.uint8)
    assert classify(grey, "icons")[1] is None


def test_attribute_dropout_on_the_icon_template():
    captions = [c.caption for c in split_combos("icons", "train")]
    attributes = attribute_words(captions)
    assert attributes == {*ICON_WORLDS["icons"]["shapes"], *ICON_WORLDS["icons"]["colours"]}
    assert _attribute_drops(icon_caption("moon", "blue"), attributes) == [
        "a icon on blue",  # = resolve_negative(prompt, "moon"): the query's c-
        "a moon icon on",
    ]
    assert _attribute_drops("a red triangle", attribute_words(["a red triangle", "a blue circle"]))
    assert _attribute_drops("a red triangle") == ["a triangle", "a red"]
