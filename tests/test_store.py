"""The feature store and the Fisher artifact without Ray: the feature layout (exact round
trip, older stores still read), atomic shard writes and resume, provenance refusal, partial
Grams vs the dense Gram, incremental vs full Fisher merge."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctrak.kernel import fit_kernel, gram
from pipeline.errors import (
    ProvenanceMismatchError,
    StaleFisherError,
    StoreCorruptError,
    StoreNotFoundError,
)
from pipeline.feature_file import feature_table, feature_view, parquet_batches, table_features
from pipeline.fisher import current_kernel, fisher_info, update_fisher
from pipeline.scan.scanner import score_block
from pipeline.shards import ShardRef
from pipeline.storage import write_atomic
from pipeline.store import FeatureStore, check_provenance

K = 8
PROVENANCE = {"model": "abc", "method": "concept-trak", "projection_k": K, "projection_seed": 0}


def _shard(store: FeatureStore, shard: str, n: int, seed: int, dtype: str = "float16"):
    """Write a shard of n random features; return them (n, k) float32."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, K)).astype(np.float32)
    columns = {
        "row": list(range(n)),
        "key": [f"{shard}{i:04d}" for i in range(n)],
        "caption": ["a red circle"] * n,
        "metadata": [json.dumps({"i": i}) for i in range(n)],
    }
    rejects = [{"row": n, "key": f"{shard}{n:04d}", "reason": "missing caption (.txt member)"}]
    store.write_shard(ShardRef(shard, f"/data/{shard}.tar", 0), columns, features, rejects, dtype)
    return features


def _files(root) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_stored_precision(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    store.open(PROVENANCE, "float16", create=True)
    features = _shard(store, "00000", 5, seed=1)
    names = sorted(_files(tmp_path / "store"))
    assert names == [
        "done/00000.json",
        "features/00000.parquet",
        "grams/00000.npy",
        "rejects/00000.parquet",
        "store.json",
    ]
    (entry,) = store.entries().values()
    assert (entry.rows, entry.rejects, entry.source) == (5, 1, "/data/00000.tar")
    table = store.read_features(entry)
    field = table.schema.field("feature")
    assert str(field.type) == "fixed_size_binary[16]" and field.metadata == {b"dtype": b"float16"}
    assert table.column_names == [
        "key",
        "shard",
        "row",
        "caption",
        "metadata",
        "feature",
        "feature_norm",
    ]
    stored = table_features(table)
    np.testing.assert_array_equal(stored, features.astype(np.float16))
    norms = np.linalg.norm(stored.astype(np.float64), axis=1)
    np.testing.assert_allclose(table.column("feature_norm").to_numpy(), norms, rtol=1e-7)
    # the partial Gram is the Gram of the STORED values, exactly
    np.testing.assert_array_equal(store.load_gram(entry), gram(torch.from_numpy(stored)).numpy())
    assert store.read_rejects(entry).column("reason").to_pylist() == [
        "missing caption (.txt member)"
    ]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_feature_layout_round_trips_exactly(tmp_path, dtype):
    """Stored features read back bit for bit: the whole table, sliced tables, and the record
    batches a query scans; the feature column is PLAIN and uncompressed, the rest snappy."""
    store = FeatureStore(str(tmp_path / "store"))
    store.open(PROVENANCE, dtype, create=True)
    features = _shard(store, "00000", 37, seed=4, dtype=dtype)
    features[5] = [np.inf, -0.0, 1e-7, 65504, -1e-30, 3.0, np.nan, 7.0]  # edge values
    store.write_shard(
        ShardRef("00000", "/data/00000.tar", 0),
        {
            "row": list(range(37)),
            "key": [f"k{i}" for i in range(37)],
            "caption": ["c"] * 37,
            "metadata": ["{}"] * 37,
        },
        features,
        [],
        dtype,
    )
    (entry,) = store.entries().values()
    written = features.astype(dtype)  # (37, 8)
    table = store.read_features(entry)
    read = table_features(table)
    assert read.dtype == np.dtype(dtype) and read.shape == (37, K)
    assert read.tobytes() == written.tobytes()  # NaN, -0.0 and inf included
    assert table_features(table.slice(30, 5)).tobytes() == written[30:35].tobytes()
    batches = list(store.feature_batches(entry, rows=10))
    assert [b.num_rows for b in batches] == [10, 10, 10, 7]
    scanned = np.concatenate([feature_view(b) for b in batches])
    assert scanned.tobytes() == written.tobytes()
    column = pq.ParquetFile(tmp_path / "store/features/00000.parquet").metadata.row_group(0)
    codecs = {column.column(i).path_in_schema: column.column(i) for i in range(7)}
    assert codecs["feature"].compression == "UNCOMPRESSED"
    assert "RLE_DICTIONARY" not in codecs["feature"].encodings
    assert codecs["caption"].compression == "SNAPPY"


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_older_fixed_size_list_stores_still_read_and_score(dtype):
    """A feature file of the earlier layout (fixed_size_list, pq.write_table defaults, no
    feature_norm) reads to the same features and scores to the same hits as the new one."""
    rng = np.random.default_rng(7)
    phi = rng.standard_normal((23, K)).astype(dtype)
    columns = {
        "row": list(range(23)),
        "key": [f"k{i}" for i in range(23)],
        "caption": ["c"] * 23,
        "metadata": ["{}"] * 23,
    }
    new = feature_table("00000", columns, phi)
    old = new.drop_columns(["feature", "feature_norm"]).append_column(
        "feature", pa.FixedSizeListArray.from_arrays(pa.array(phi.reshape(-1)), K)
    )
    buffer = io.BytesIO()
    pq.write_table(old, buffer)  # the earlier writer: dictionary + snappy everywhere
    read = pq.read_table(pa.BufferReader(buffer.getvalue()))
    assert str(read.schema.field("feature").type).startswith("fixed_size_list")
    assert table_features(read).tobytes() == phi.tobytes()
    assert table_features(read.slice(4, 9)).tobytes() == phi[4:13].tobytes()
    x = rng.standard_normal((3, K))
    (block,) = parquet_batches(buffer.getvalue(), rows=100)
    hits = score_block(block, x=x, top_k=4, shard_index={"00000": 0})
    same = score_block(feature_table("00000", columns, phi), x=x, top_k=4, shard_index={"00000": 0})
    assert hits.column("row").to_pylist() == same.column("row").to_pylist()
    np.testing.assert_allclose(hits["score"].to_numpy(), same["score"].to_numpy(), rtol=1e-12)


def test_a_feature_column_of_another_layout_is_named():
    table = pa.table({"feature": pa.array([b"ab", b"cd"], pa.binary(2))})  # no dtype
    with pytest.raises(StoreCorruptError, match="fixed_size_binary with field metadata"):
        table_features(table)


def test_crash_before_marker_leaves_shard_pending(tmp_path, monkeypatch):
    store = FeatureStore(str(tmp_path / "store"))
    store.open(PROVENANCE, "float16", create=True)
    _shard(store, "00000", 4, seed=1)

    def crash(fs, path, data, retry):
        if "/done/" in path:
            raise KeyboardInterrupt("killed before the marker")
        write_atomic(fs, path, data, retry)

    monkeypatch.setattr("pipeline.store.write_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        _shard(store, "00001", 4, seed=2)
    monkeypatch.undo()
    # the data files were written, but without a marker no reader takes the shard as finished
    assert (tmp_path / "store/features/00001.parquet").exists()
    assert store.done_ids() == ["00000"]
    assert not list((tmp_path / "store").rglob("*.tmp-*"))  # no temp file left behind
    # the rerun rewrites it under the same names and marks it done
    _shard(store, "00001", 4, seed=2)
    assert store.done_ids() == ["00000", "00001"]


def test_provenance_mismatch_names_fields_and_fix(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    with pytest.raises(StoreNotFoundError, match="ctrak featurize"):
        store.open(PROVENANCE, "float16", create=False)
    store.open(PROVENANCE, "float16", create=True)
    store.open(PROVENANCE, "float16", create=False)  # same settings: fine
    with pytest.raises(ProvenanceMismatchError) as err:
        store.open({**PROVENANCE, "projection_seed": 1}, "float32", create=True)
    message = str(err.value)
    assert "projection_seed: store 0" in message and "attribution.projection.seed" in message
    assert "feature_dtype" in message and "job.store=NEW_URI" in message
    check_provenance({"timesteps": (1, 2)}, {"timesteps": [1, 2]})  # tuples == JSON lists


def test_fisher_incremental_equals_full_merge_and_dense(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    store.open(PROVENANCE, "float16", create=True)
    parts = [_shard(store, "00000", 6, 1), _shard(store, "00001", 3, 2)]
    info, added = update_fisher(store, ratio=1.0)
    assert added == 2 and sorted(info["shards"]) == ["00000", "00001"]
    assert update_fisher(store, ratio=1.0)[1] == 0  # current: nothing read, nothing written
    parts.append(_shard(store, "00002", 5, 3))
    with pytest.raises(StaleFisherError, match="ctrak reindex"):
        current_kernel(store, 1.0)
    info, added = update_fisher(store, ratio=1.0)
    assert added == 1  # only the new shard's Gram
    kernel, _ = current_kernel(store, 1.0)
    # the same sums in the same order as merging every shard at once ...
    full = FeatureStore(str(tmp_path / "full"))
    full.open(PROVENANCE, "float16", create=True)
    for i, seed in enumerate((1, 2, 3)):
        _shard(full, f"0000{i}", (6, 3, 5)[i], seed)
    update_fisher(full, ratio=1.0)
    assert torch.equal(current_kernel(full, 1.0)[0].K, kernel.K)
    # ... and the dense Gram of all stored features, factorised the engine's way
    stored = torch.from_numpy(np.concatenate(parts).astype(np.float16))
    dense = fit_kernel(gram(stored), 1.0)
    torch.testing.assert_close(kernel.K, dense.K, rtol=1e-12, atol=1e-12)
    assert kernel.lam == pytest.approx(dense.lam, rel=1e-12)
    # another damping ratio refactorises the stored K
    assert current_kernel(store, 10.0)[0].lam == pytest.approx(10 * kernel.lam)
    assert fisher_info(store)["rows"] == 14


def test_corrupt_gram_is_refused(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    store.open(PROVENANCE, "float16", create=True)
    _shard(store, "00000", 4, 1)
    gram_file = tmp_path / "store/grams/00000.npy"
    gram_file.write_bytes(gram_file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StoreCorruptError, match=r"done/00000\.json"):
        update_fisher(store, ratio=1.0)


def test_truncated_altered_or_missing_shard_files_are_named(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    store.open(PROVENANCE, "float16", create=True)
    _shard(store, "00000", 4, 1)
    (entry,) = store.entries().values()
    features = tmp_path / "store/features/00000.parquet"
    data = features.read_bytes()
    fix = r"delete .*done/00000\.json and run `ctrak reindex`"
    for broken in (data[:-9], data[:50] + bytes([data[50] ^ 4]) + data[51:]):
        features.write_bytes(broken)
        with pytest.raises(StoreCorruptError, match=rf"shard 00000: .*checksum.*; {fix}"):
            store.read_features(entry)
    features.unlink()
    with pytest.raises(StoreCorruptError, match=rf"shard 00000: .*is missing.*; {fix}"):
        store.read_features(entry)
    # a marker that does not parse, or is not a marker, is refused by name
    marker = tmp_path / "store/done/00000.json"
    body = marker.read_text()
    marker.write_text(body[: len(body) // 2])
    with pytest.raises(StoreCorruptError, match=r"done/00000\.json .* not valid JSON"):
        store.entries()
    marker.write_text('{"shard": "00000"}')
    with pytest.raises(StoreCorruptError, match="not a done-marker"):
        store.entries()


def test_corrupt_fisher_names_the_fix_and_the_fix_works(tmp_path):
    store = FeatureStore(str(tmp_path / "store"))
    store.open(PROVENANCE, "float16", create=True)
    _shard(store, "00000", 4, 1)
    update_fisher(store, ratio=1.0)
    kernel_file = tmp_path / "store/fisher/kernel.npz"
    good = current_kernel(store, 1.0)[0].K
    kernel_file.write_bytes(kernel_file.read_bytes()[:-5])
    with pytest.raises(StoreCorruptError, match=r"delete fisher/fisher\.json and run `ctrak"):
        current_kernel(store, 1.0)
    (tmp_path / "store/fisher/fisher.json").unlink()
    assert update_fisher(store, ratio=1.0)[1] == 1  # re-merged from the shard's Gram
    assert torch.equal(current_kernel(store, 1.0)[0].K, good)
