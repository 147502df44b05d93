"""Pipeline parts without Ray: tar decoding and reject records, shard assembly from streamed
records, per-block top-k merged vs the dense top-k, and the TOML config loader."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ctrak.errors import ConfigError
from ctrak.kernel import scores
from ctrak.topk import topk
from pipeline.config import StorageConfig
from pipeline.config_file import load_config, parse_override
from pipeline.errors import UnknownConfigKeyError
from pipeline.feature_file import feature_table
from pipeline.ingest import ShardAssembler, split_records
from pipeline.scan.scanner import gather, score_block, score_shard
from pipeline.shards import decode_shard, list_shards

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _png(size: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buffer, format=fmt)
    return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _decode(path: Path, shard: str = "00000") -> list[dict]:
    batch = {"shard": np.array([shard], object), "uri": np.array([str(path)], object)}
    rows = []
    for out in decode_shard(batch, storage=StorageConfig(), image_size=16, rows_per_batch=3):
        for i in range(len(out["row"])):
            rows.append({name: out[name][i] for name in out})
    return rows


def test_decode_records_every_problem_as_a_reject(tmp_path):
    meta = json.dumps({"url": "x"}).encode()
    _tar(
        tmp_path / "00000.tar",
        [
            ("000000000.png", _png(16)),
            ("000000000.txt", b"a red circle"),
            ("000000000.json", meta),
            ("000000001.jpg", _png(16, fmt="JPEG")),
            ("000000001.txt", b"a blue circle"),
            ("000000002.png", _png(24)),
            ("000000002.txt", b"too big"),
            ("000000003.png", _png(16)),  # no caption
            ("000000004.jpg", b"not an image"),
            ("000000004.txt", b"broken"),
            ("000000005.png", _png(16, mode="L")),
            ("000000005.txt", b"grey"),
            ("000000006.png", _png(16)),
            ("000000006.txt", b"x"),
            ("000000006.json", b"[1]"),
            ("000000000.png", _png(16)),
            ("000000000.txt", b"again"),  # duplicate key
            ("../../escape.txt", b"names are data, never paths"),
        ],
    )
    rows = _decode(tmp_path / "00000.tar")
    end = rows.pop()
    assert (end["row"], end["count"], end["reason"]) == (-1, 9, "")
    reasons = {r["row"]: r["reason"] for r in rows}
    assert reasons[0] == reasons[1] == ""
    assert rows[0]["caption"] == "a red circle" and json.loads(rows[0]["metadata"]) == {"url": "x"}
    assert rows[0]["image"].shape == (16, 16, 3) and rows[0]["image"].dtype == np.uint8
    assert rows[1]["metadata"] == ""  # no .json member: no metadata, nothing invented
    assert reasons[2] == "image is 24x24, the model takes 16x16"
    assert reasons[3] == "missing caption (.txt member)"
    assert reasons[4].startswith("undecodable image")
    assert reasons[5] == "image mode is L, expected RGB"
    assert reasons[6] == "metadata (.json member) is not a JSON object"
    assert reasons[7] == "duplicate key"
    assert rows[8]["key"] == "../../escape" and reasons[8].startswith("no image member")
    assert not (tmp_path.parent / "escape.txt").exists()
    assert all(not r["image"].any() for r in rows if r["reason"])  # rejects carry no pixels


def test_unreadable_truncated_and_empty_tars(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"\x00garbage" * 100)
    bad, end = _decode(tmp_path / "bad.tar", "bad")
    assert (bad["row"], bad["key"]) == (0, "") and bad["reason"].startswith("unreadable tar")
    assert (end["row"], end["count"], end["reason"]) == (-1, 1, "")
    # a tar cut off inside its third sample: two samples decode, the third is the reject
    members = []
    for i in range(3):
        members += [(f"00000000{i}.png", _png(16)), (f"00000000{i}.txt", b"a red circle")]
    _tar(tmp_path / "whole.tar", members)
    data = (tmp_path / "whole.tar").read_bytes()
    offset = data.index(b"000000002.png")  # the third sample's first header
    (tmp_path / "cut.tar").write_bytes(data[: offset + 700])
    *rows, end = _decode(tmp_path / "cut.tar", "cut")
    assert [r["reason"] for r in rows[:2]] == ["", ""]
    assert rows[2]["key"] == "000000002" and rows[2]["reason"].startswith("truncated tar")
    assert (end["row"], end["count"]) == (-1, 3)
    _tar(tmp_path / "empty.tar", [])
    (end,) = _decode(tmp_path / "empty.tar", "empty")
    assert (end["row"], end["count"], end["reason"]) == (-1, 0, "")
    assert [s.id for s in list_shards(str(tmp_path))] == ["bad", "cut", "empty", "whole"]


def _records(shard: str, rows: list[int], k: int = 4) -> dict[str, np.ndarray]:
    n = len(rows)
    return {
        "shard": np.array([shard] * n, object),
        "row": np.array(rows),
        "key": np.array([f"{shard}-{r}" for r in rows], object),
        "caption": np.array(["c"] * n, object),
        "metadata": np.array([""] * n, object),
        "reason": np.array(["" if r != 1 else "duplicate key" for r in rows], object),
        "count": np.array([3 if r == -1 else 0 for r in rows]),
        "feature": np.arange(n * k, dtype=np.float32).reshape(n, k),
    }


def test_assembler_completes_shards_out_of_order_and_ignores_duplicates():
    assembler = ShardAssembler()
    assert assembler.add(_records("a", [-1, 2])) == []  # the end record may come first
    assert assembler.add(_records("b", [0, 1, 2])) == []
    assert assembler.add(_records("a", [2, 0])) == []  # a retried task's duplicate row 2
    ((shard, records),) = assembler.add(_records("a", [1]))
    assert (shard, [r.row for r in records]) == ("a", [0, 1, 2])
    columns, features, rejects = split_records(records, k=4)
    assert columns["row"] == [0, 2] and features.shape == (2, 4)
    assert rejects == [{"row": 1, "key": "a-1", "reason": "duplicate key"}]
    assert [s for s, _ in assembler.add(_records("b", [-1]))] == ["b"]


def test_per_block_topk_merges_to_the_dense_topk():
    rng = np.random.default_rng(0)
    sizes = {"00000": 7, "00001": 5, "00002": 9}
    tables, dense = [], []
    for shard, n in sizes.items():
        phi = rng.standard_normal((n, 6)).astype(np.float16)
        if shard == "00001":
            phi[3] = phi[1]  # an exact tie: the lower global row must rank first
        columns = {
            "row": list(range(n)),
            "key": [f"{shard}/{i}" for i in range(n)],
            "caption": ["c"] * n,
            "metadata": ["{}"] * n,
        }
        tables.append(feature_table(shard, columns, phi))
        dense.append(phi)
    table = pa.concat_tables(tables)
    order = np.random.default_rng(1).permutation(table.num_rows)  # blocks arrive shuffled
    table = table.take(pa.array(order))
    x = rng.standard_normal((3, 6))
    index = {s: i for i, s in enumerate(sizes)}
    blocks = [table.slice(a, b - a) for a, b in ((0, 4), (4, 5), (5, 13), (13, 21))]
    candidates = pa.concat_tables([score_block(b, x=x, top_k=6, shard_index=index) for b in blocks])
    hits = gather(candidates, 3, 6)
    reference = topk(scores(torch.from_numpy(np.concatenate(dense)), torch.from_numpy(x)), 6)
    keys = [f"{s}/{i}" for s, n in sizes.items() for i in range(n)]
    for j in range(3):
        assert [h["key"] for h in hits[j]] == [keys[i] for i in reference.indices[j]]
        np.testing.assert_allclose([h["score"] for h in hits[j]], reference.values[j], rtol=1e-12)
    # one task's path: record batches of a few rows -> score_shard (blocks merged) -> gather
    batches = table.to_batches(max_chunksize=5)
    merged = gather(score_shard(batches, x=x, top_k=6, shard_index=index), 3, 6)
    assert [[h["key"] for h in q] for q in merged] == [[h["key"] for h in q] for q in hits]


def test_config_file_overrides_and_refusals(tmp_path):
    assert parse_override("attribution.gradient.timesteps=[499, 899]")[1] == [499, 899]
    assert parse_override("job.store=s3://bucket/p")[1] == "s3://bucket/p"
    config = load_config(
        str(CONFIGS / "dev-local.toml"),
        ["attribution.projection.k=32", "job.batch_size=4", 'job.feature_dtype="float32"'],
    )
    assert config.attribution.projection.k == 32 and config.job.batch_size == 4
    assert config.job.feature_dtype == "float32"
    assert isinstance(config.attribution.gradient.timesteps, tuple)
    with pytest.raises(UnknownConfigKeyError, match=r"projection\.kk"):
        load_config(None, ["attribution.projection.kk=3"])
    with pytest.raises(ConfigError, match="must be a int"):
        load_config(None, ["job.batch_size=many"])
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        load_config(None, ["storage.secret=hunter2"])
    secret = StorageConfig(key="AKIA-test", secret="hunter2")
    assert "hunter2" not in repr(secret) and "AKIA" not in repr(secret)
    for path in CONFIGS.glob("*.toml"):
        load_config(str(path))  # every example parses


def test_storage_credentials_come_from_the_aws_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    options = StorageConfig().resolved().s3fs_options()
    assert options.pop("config_kwargs")["retries"]["total_max_attempts"] == 2
    assert options == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"},
        "key": "AKIA-env",
        "secret": "env-secret",
    }
    given = StorageConfig(endpoint_url="http://10.0.0.1:8333", key="k", secret="s").resolved()
    assert (given.endpoint_url, given.key, given.region) == (
        "http://10.0.0.1:8333",
        "k",
        "eu-west-1",
    )
    assert "secret" not in StorageConfig(profile="dev").resolved().s3fs_options()
