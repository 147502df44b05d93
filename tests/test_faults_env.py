"""Bad environments and odd input found by hand (issue 23, item 8), each a named error or a
reject reason, nothing lost:

- a read-only store: StoreNotWritableError naming the path before any work (no model load);
- a full disk (a real 1 MB tmpfs filled mid-job): StoreWriteError naming the path and the
  space the job needs; after freeing space the rerun resumes and equals a clean run;
- a JPEG with an EXIF orientation is decoded rotated, as viewers show it, and the store
  records that (store.json `decode`); a store without that record is refused by reindex;
- a caption over job.max_caption_bytes rejects its row with the reason;
- the closing summary names how many reasons it left out past its top 5.

The file systems are real: a tmpfs mounted for the test (the suite runs as root); without
the right to mount, a chmod'ed folder (read-only) and an ENOSPC raised at the rename (full).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_faults import _config, _contents, assert_like_clean

from ctrak.toy.world_shards import generate_world
from pipeline.cluster import ray_session
from pipeline.errors import ProvenanceMismatchError, StoreNotWritableError, StoreWriteError
from pipeline.ingest import IngestSummary, ingest
from pipeline.results import print_summary
from pipeline.shards import DECODE, decode_image, decode_shard
from pipeline.store import FeatureStore


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of `size` at `path` (yields True), or a plain folder (False) without
    the right to mount."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def read_only(path: Path, mounted: bool) -> None:
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    else:
        path.chmod(0o555)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("env-data") / "paper"
    generate_world("paper", str(folder), num_images=6, image_size=16, shard_size=3, seed=4)
    return folder


@pytest.fixture(scope="module")
def clean(data, pixel_model_dir, ray_cluster, tmp_path_factory):
    store = tmp_path_factory.mktemp("env-clean") / "store"
    config = _config(pixel_model_dir, data, store)
    with ray_session(config.ray):
        ingest(config, create=True, progress=False)
    meta = json.loads((store / "store.json").read_text())
    assert meta["decode"] == DECODE == {"exif_orientation": "applied"}  # recorded
    return {**_contents(FeatureStore(str(store))), "uri": str(store)}


def test_a_read_only_store_is_refused_before_any_work(data, clean, pixel_model_dir, tmp_path):
    root = tmp_path / "ro"
    with tmpfs(root, "1m") as mounted:
        config = _config(pixel_model_dir, data, root / "store")
        shutil.copytree(clean["uri"], root / "store")  # an existing store, made read-only
        (root / "store" / "done" / "00001.json").unlink()  # reindex would redo a shard
        read_only(root, mounted)
        calls = []
        with pytest.MonkeyPatch.context() as patch, ray_session(config.ray):
            patch.setattr("pipeline.ingest.remote_call", lambda *a, **k: calls.append(a))
            for create in (True, False):  # featurize and reindex alike
                with pytest.raises(StoreNotWritableError, match=str(root / "store")):
                    ingest(config, create=create, progress=False)
        assert calls == []  # refused before the model was loaded or any shard read
        if not mounted:
            root.chmod(0o755)


def _fill(folder: Path) -> Path:
    """Write a filler file until the file system is full; returns it."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def test_a_full_disk_names_the_path_and_the_space_needed_then_resumes(
    data, clean, pixel_model_dir, tmp_path, monkeypatch
):
    root = tmp_path / "full"
    with tmpfs(root, "1m") as mounted:
        config = _config(pixel_model_dir, data, root / "store")
        original = FeatureStore.write_shard
        filled: list[Path] = []

        def write_shard(self, *args, **kwargs):  # the disk fills up before the 2nd shard
            if self.entries() and not filled:
                if mounted:
                    filled.append(_fill(root))
                else:  # no tmpfs: the rename of a shard file fails as on a full disk
                    filled.append(root)
                    monkeypatch.setattr(
                        "pipeline.storage.os.replace",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")),
                    )
            return original(self, *args, **kwargs)

        monkeypatch.setattr(FeatureStore, "write_shard", write_shard)
        with ray_session(config.ray), pytest.raises(StoreWriteError) as err:
            ingest(config, create=True, progress=False)
        message = str(err.value)
        assert str(root / "store") in message and "[errno 28]" in message
        assert "The job still needs about" in message and "1 shard(s)" in message
        assert "MB free" in message and "rerun" in message
        monkeypatch.undo()
        if mounted:
            filled[0].unlink()
        assert not list((root / "store").rglob("*.tmp-*"))  # no partial file left
        with ray_session(config.ray):
            summary = ingest(config, create=False, progress=False)
        assert (summary.skipped, summary.written) == (1, 1)
        assert_like_clean(FeatureStore(str(root / "store")), clean)


def _jpeg(array: np.ndarray, orientation: int | None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # the Orientation tag
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


def test_exif_orientation_is_applied_and_recorded(clean, data, pixel_model_dir, tmp_path):
    gradient = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
    plain = decode_image(_jpeg(gradient, None), 16)
    turned = decode_image(_jpeg(gradient, 3), 16)  # 3: rotated 180 degrees
    mirrored = decode_image(_jpeg(gradient, 2), 16)  # 2: mirrored left-right
    np.testing.assert_array_equal(turned, plain[::-1, ::-1])
    np.testing.assert_array_equal(mirrored, plain[:, ::-1])
    # a store whose store.json predates the record is refused by reindex (would mix decodes)
    store = tmp_path / "old"
    shutil.copytree(Path(clean["uri"]), store)
    meta = json.loads((store / "store.json").read_text())
    del meta["decode"]
    (store / "store.json").write_text(json.dumps(meta))
    config = _config(pixel_model_dir, data, store)
    with ray_session(config.ray), pytest.raises(ProvenanceMismatchError, match="EXIF"):
        ingest(config, create=False, progress=False)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def test_a_caption_over_the_byte_limit_rejects_its_row(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (16, 16), 70).save(png, format="PNG")
    members = [
        ("a.png", png.getvalue()),
        ("a.txt", b"a red circle"),
        ("b.png", png.getvalue()),
        ("b.txt", b"x" * (5 << 20)),  # a 5 MB caption
    ]
    (tmp_path / "00000.tar").write_bytes(_tar(members))
    batch = {"shard": np.array(["00000"], object), "uri": np.array([str(tmp_path / "00000.tar")])}
    from pipeline.config import StorageConfig

    def reasons(**limit) -> list[str]:
        out = list(decode_shard(batch, storage=StorageConfig(), image_size=16, **limit))
        return [
            str(r) for b in out for r, row in zip(b["reason"], b["row"], strict=True) if row >= 0
        ]

    assert reasons() == ["", "caption is 5242880 bytes > job.max_caption_bytes=16384"]
    assert reasons(max_caption_bytes=5) == [
        "caption is 12 bytes > job.max_caption_bytes=5",
        "caption is 5242880 bytes > job.max_caption_bytes=5",
    ]


def test_the_summary_says_how_many_reasons_it_left_out(capsys):
    summary = IngestSummary(store="s3://b/store", rejected=28)
    summary.reasons = {f"reason {i}": 10 - i for i in range(7)}  # 10, 9, ..., 4
    print_summary(summary, "featurize")
    out = capsys.readouterr().out
    assert "reason 4" in out and "reason 5" not in out
    assert "and 2 more reason(s) (9 row(s)) in s3://b/store/rejects/" in out
