"""The attribution report: a self-contained, escaped HTML file and a PNG of its grid, rendered
from synthetic images; headless Chromium shows it (a non-blank screenshot); hit images come
back from the input tars; and `ctrak query --report` writes it end to end on a small store."""

from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ctrak.toy.world_shards import generate_world, read_samples
from ctrak.toy.worlds import render, sample_row
from jobs.cli import main
from pipeline.errors import StorageError
from pipeline.images import data_sources, fetch_images
from pipeline.report.render import render_report
from pipeline.report.sections import MethodHits, ReportHit, Section, precision_at_k, relevance

EVIL = '<script>alert("x")</script> & <b>bold</b>'


def _sections() -> list[Section]:
    """Two queries: one with an image and two methods, one (global scope) without."""
    rows = [sample_row("paper", "train", i, 16, 0) for i in range(12)]
    query = render("triangle", "red", (8.0, 9.0), 5.0, 16)

    def method(name: str, order: list[int], concept: str) -> MethodHits:
        labels = [rows[i][1] for i in order]
        marks = relevance(concept, labels)
        hits = [
            ReportHit(
                rank=r + 1,
                key=f"00000{i:04d}",
                score=1.0 / (r + 1),
                caption=EVIL if r == 0 else f"a {lab['colour']} {lab['shape']}",
                labels=lab,
                image=rows[i][0],
                relevant=mark,
                shard="00000",
            )
            for r, (i, lab, mark) in enumerate(zip(order, labels, marks, strict=True))
        ]
        return MethodHits(name, hits, precision_at_k(marks))

    return [
        Section(
            "a red triangle",
            [method("concept-trak", list(range(8)), "triangle"), method("trak", [1, 4, 6], "red")],
            concept="triangle",
            negative="a red",
            image=query,
            note=EVIL,
        ),
        Section(f"a blue circle {EVIL}", [method("concept-trak", [1, 2, 3], "blue")], "blue"),
    ]


def test_relevance_marks_the_concept_attribute():
    labels = [{"shape": "triangle", "colour": "red"}, {"shape": "circle"}, {"x": "y"}, None]
    assert relevance("triangle", labels) == [True, False, None, None]
    assert relevance(None, labels) == [None] * 4
    assert relevance("dog", labels) == [None] * 4
    assert precision_at_k([True, False, True, False]) == 0.5
    assert precision_at_k([True, None]) is None


def test_report_is_self_contained_and_escaped(tmp_path):
    path_html, path_png = tmp_path / "report.html", tmp_path / "report.png"
    render_report(_sections(), path_html, path_png, title=f"title {EVIL}")
    text = path_html.read_text()
    # 1. self-contained: every image an inline data URI, no links, no scripts
    assert not re.search(r"https?://", text)
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 1 + 8 + 3 + 3  # the query image + every hit
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert "<b>bold</b>" not in text and html.escape(EVIL) in text
    # 2. the content a reader needs: prompt, concept, negative, methods, marks, scores, labels
    for needed in ("a red triangle", "triangle", "a red", "concept-trak", "trak", "P@8 = 0.38"):
        assert needed in text
    # train combos cycle (triangle, blue), (circle, red), (circle, blue): 3 triangles in 0..7
    assert text.count('class="hit ok"') == 3 + 2 + 2
    assert "shape: triangle" in text and "0.3333" in text
    # 3. the PNG of the same grid: wide enough for 8 thumbnails, two sections, not blank
    with Image.open(path_png) as image:
        assert image.mode == "RGB" and image.width >= 8 * 96 and image.height >= 2 * 160
        pixels = np.asarray(image)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


def test_chromium_shows_the_report(tmp_path):
    # tests/run.sh installs Debian's chromium; without it this test fails rather than skips
    assert shutil.which("chromium"), "chromium is missing: run tests/run.sh (it installs it)"
    path_html, shot = tmp_path / "report.html", tmp_path / "shot.png"
    render_report(_sections(), path_html)
    command = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,900",
        path_html.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {done.returncode}): {done.stderr}"
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        pixels = np.asarray(image.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert pixels.std() > 20 and len(colours) > 100 and (pixels < 250).any(axis=2).mean() > 0.1
    # the hit images are on screen: the synthetic palette's red and blue fills
    for fill in ((220, 40, 40), (40, 80, 220)):
        assert (np.abs(pixels.astype(int) - fill).max(axis=2) < 40).sum() > 200


def test_fetch_images_reads_hits_from_their_tars(tmp_path):
    generate_world("paper", str(tmp_path), num_images=10, image_size=16, shard_size=4, seed=3)
    rows = {r["key"]: r for r in read_samples(str(tmp_path))}
    sources = data_sources(str(tmp_path))
    assert sorted(sources) == ["00000", "00001", "00002"]
    wanted = [("00000", "000000002"), ("00002", "000020001"), ("00001", "000019999")]
    images = fetch_images(sources, wanted)
    assert sorted(images) == sorted(wanted[:2])  # a key the tar lacks is absent
    for (_, key), image in images.items():
        np.testing.assert_array_equal(image, rows[key]["image"])
    with pytest.raises(StorageError, match="no source tar"):
        fetch_images(sources, [("nope", "x")])
    with pytest.raises(StorageError, match="does not exist"):
        fetch_images({"00000": str(tmp_path / "gone.tar")}, [("00000", "000000000")])


def test_fetch_images_over_s3(s3_server, s3_storage):
    uri = f"s3://{s3_server.bucket}/report-data"
    options = s3_storage.s3fs_options()
    generate_world("paper", uri, num_images=6, image_size=16, shard_size=3, storage_options=options)
    rows = {r["key"]: r for r in read_samples(uri, options)}
    sources = data_sources(uri, s3_storage)
    assert sources["00001"] == f"{uri}/00001.tar"
    images = fetch_images(sources, [("00001", "000010002"), ("00000", "000000000")], s3_storage)
    for (_, key), image in images.items():
        np.testing.assert_array_equal(image, rows[key]["image"])
    assert len(images) == 2


def test_query_report_through_the_cli(tmp_path, pixel_model_dir, ray_cluster, capsys):
    data, store = tmp_path / "data", tmp_path / "store"
    generate_world("paper", str(data), num_images=8, image_size=16, shard_size=4, seed=1)
    rows = list(read_samples(str(data)))
    common = [
        f"job.data={data}",
        f"job.store={store}",
        f"job.model={pixel_model_dir}",
        "attribution.projection.k=16",
        "attribution.gradient.timesteps=[499]",
        "job.batch_size=8",
        "--no-progress",
    ]
    assert main(["featurize", *common]) == 0
    query_image = tmp_path / "query.png"
    buffer = io.BytesIO()
    Image.fromarray(rows[2]["image"]).save(buffer, format="PNG")
    query_image.write_bytes(buffer.getvalue())
    shape = rows[2]["labels"]["shape"]
    report, hits = tmp_path / "out" / "report.html", tmp_path / "hits.json"
    argv = ["query", *common, "--prompt", rows[2]["caption"], "--concept", shape]
    argv += ["--image", str(query_image), "--top-k", "5", "--json", str(hits)]
    assert main([*argv, "--report", str(report)]) == 0
    assert f"report: {report}" in capsys.readouterr().out
    text = report.read_text()
    top = json.loads(hits.read_text())["results"][0]["hits"]
    # the query image and all five hits inline; marks follow the hits' shape labels
    assert text.count('src="data:image/png;base64,') == 1 + 5
    assert "no image" not in text
    assert text.count('class="hit ok"') == sum(h["metadata"]["shape"] == shape for h in top)
    assert text.count('class="hit no"') == sum(h["metadata"]["shape"] != shape for h in top)
    for hit in top:
        assert f">{hit['key']}<" in text
    with Image.open(report.with_suffix(".png")) as image:
        assert image.width >= 5 * 96
    # the tars moved since featurizing: the images come from job.data, same file names
    moved = tmp_path / "moved"
    data.rename(moved)
    argv = [a.replace(str(data), str(moved)) for a in argv]
    assert main([*argv, "--report", str(tmp_path / "again.html")]) == 0
    assert (tmp_path / "again.html").read_text().count('src="data:image/png;base64,') == 1 + 5
