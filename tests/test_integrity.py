"""Shard integrity against the source's own count (img2dataset's {shard}_stats.json and
{shard}.parquet), and keys stored in more than one shard (issue 23, items 4 and 5), through
`ctrak featurize` on a local store.

- 00000: intact (3 samples, declared 3);
- 00001: the tar cut exactly at a member boundary (2 samples read as a valid tar, 3 declared)
  -> every row rejected + one record for the missing sample;
- 00002: no stats.json; its parquet declares 3 "success" rows, the tar holds 4 -> rejected;
- 00003: a copy of 00000 (its keys again, in another shard) -> the duplicate-key report.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from ctrak.toy.world_shards import generate_world
from jobs.cli import main
from pipeline.integrity import REPORT
from pipeline.shards import declared_count, list_shards
from pipeline.store import FeatureStore

SETTINGS = [
    "attribution.projection.k=32",
    "attribution.gradient.timesteps=[499, 899]",
    "job.batch_size=4",
    "job.max_reject_fraction=1.0",
    "--no-progress",
]


def _members(tar_bytes: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def _bad_data(folder):
    generate_world("paper", str(folder), num_images=9, image_size=16, shard_size=3, seed=6)
    # 00001: cut at the header of the third sample's first member: a valid, shorter tar
    whole = (folder / "00001.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        members = tar.getmembers()
    third = next(m for m in members if m.name.startswith(members[-1].name.split(".")[0]))
    (folder / "00001.tar").write_bytes(whole[: third.offset])
    # 00002: one sample more than its parquet declares (and no stats.json)
    (folder / "00002_stats.json").unlink()
    extra = _members((folder / "00002.tar").read_bytes())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra[:3]:  # the first sample again under a new key
            info.name = "999999999." + info.name.split(".", 1)[1]
            tar.addfile(info, io.BytesIO(data))
    (folder / "00002.tar").write_bytes(buffer.getvalue())
    # 00003: the keys of 00000 again
    shutil.copy(folder / "00000.tar", folder / "00003.tar")
    shutil.copy(folder / "00000_stats.json", folder / "00003_stats.json")
    return folder


def test_declared_count_reads_stats_then_parquet(tmp_path):
    (tmp_path / "a_stats.json").write_text(json.dumps({"count": 5, "successes": 4}))
    assert declared_count(str(tmp_path / "a_stats.json")) == 4
    table = pa.table(
        {"key": ["1", "2", "3"], "status": ["success", "failed_to_download", "success"]}
    )
    pq.write_table(table, tmp_path / "b.parquet")
    assert declared_count(str(tmp_path / "b.parquet")) == 2
    assert declared_count("") == -1
    (tmp_path / "c_stats.json").write_text("not json")
    assert declared_count(str(tmp_path / "c_stats.json")) == -1


def test_count_mismatch_rejects_the_shard_and_duplicates_are_reported(
    pixel_model_dir, ray_cluster, tmp_path, capsys
):
    data = _bad_data(tmp_path / "data")
    manifests = {s.id: s.manifest.rsplit("/", 1)[-1] for s in list_shards(str(data))}
    assert manifests == {
        "00000": "00000_stats.json",
        "00001": "00001_stats.json",
        "00002": "00002.parquet",
        "00003": "00003_stats.json",
    }
    store = tmp_path / "store"
    args = [f"job.data={data}", f"job.store={store}", f"job.model={pixel_model_dir}", *SETTINGS]
    summary_path = tmp_path / "summary.json"
    assert main(["featurize", *args, "--json", str(summary_path)]) == 0
    printed = capsys.readouterr().out
    entries = FeatureStore(str(store)).entries()
    assert {s: (e.rows, e.rejects) for s, e in entries.items()} == {
        "00000": (3, 0),
        "00001": (0, 3),  # 2 read + 1 missing
        "00002": (0, 4),
        "00003": (3, 0),
    }
    rejects = FeatureStore(str(store)).read_rejects(entries["00001"]).to_pylist()
    assert all("shard count mismatch: 00001.tar holds 2 sample(s)" in r["reason"] for r in rejects)
    assert "declares 3" in rejects[0]["reason"] and rejects[-1]["key"] == ""
    assert rejects[-1]["reason"].startswith("1 sample(s) declared by the manifest are missing")
    # the same 3 keys in 00000 and 00003: reported, in the summary and the store
    report = json.loads((store / REPORT).read_text())
    assert report["keys"] == 3 and report["examples"][0]["shards"] == ["00000", "00003"]
    assert json.loads(summary_path.read_text())["duplicate_keys"] == 3
    assert "warning: 3 key(s) occur in more than one shard" in printed
