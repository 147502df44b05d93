"""A store shipped as a bundle (rows only, no Grams): unpacking recomputes every partial
Gram from the stored values, so the unpacked store's Fisher equals the original's, shards
left out are pending for a rerun, and a bundle that does not match its markers is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.bundle import pack_store, unpack_store
from pipeline.errors import StoreCorruptError, StoreNotFoundError
from pipeline.feature_file import table_features
from pipeline.fisher import current_kernel, update_fisher
from pipeline.shards import ShardRef
from pipeline.store import FeatureStore

K = 8
PROVENANCE = {"model": "abc", "method": "concept-trak", "projection_k": K, "projection_seed": 0}


def _store(root, shards=(("00000", 5), ("00001", 3), ("00002", 4))) -> FeatureStore:
    store = FeatureStore(str(root))
    store.open(PROVENANCE, "float16", create=True)
    rng = np.random.default_rng(0)
    for shard, n in shards:
        columns = {
            "row": list(range(n)),
            "key": [f"{shard}{i:04d}" for i in range(n)],
            "caption": ["a red circle"] * n,
            "metadata": [json.dumps({"i": i}) for i in range(n)],
        }
        features = rng.standard_normal((n, K)).astype(np.float32)
        store.write_shard(
            ShardRef(shard, f"/data/{shard}.tar", 0), columns, features, [], "float16"
        )
    update_fisher(store, ratio=1.0)
    return store


def test_unpacked_store_has_the_original_grams_and_fisher(tmp_path):
    original = _store(tmp_path / "store")
    body = pack_store(original.uri, tmp_path / "bundle", made_by="test")
    assert body["rows"] == 12 and sorted(body["shards"]) == ["00000", "00001", "00002"]
    assert not (tmp_path / "bundle" / "grams").exists()
    assert not (tmp_path / "bundle" / "fisher").exists()
    copy = FeatureStore(str(tmp_path / "copy"))
    assert unpack_store(tmp_path / "bundle", copy.uri) == ["00000", "00001", "00002"]
    for shard, entry in original.entries().items():
        assert np.array_equal(copy.load_gram(copy.entries()[shard]), original.load_gram(entry))
        assert table_features(copy.read_features(copy.entries()[shard])).tobytes() == (
            table_features(original.read_features(entry)).tobytes()
        )
    update_fisher(copy, ratio=1.0)
    assert torch.equal(current_kernel(copy, 1.0)[0].K, current_kernel(original, 1.0)[0].K)


def test_dropped_shards_are_pending_and_the_rest_are_finished(tmp_path):
    original = _store(tmp_path / "store")
    pack_store(original.uri, tmp_path / "bundle")
    copy = FeatureStore(str(tmp_path / "copy"))
    assert unpack_store(tmp_path / "bundle", copy.uri, drop=["00001"]) == ["00000", "00002"]
    assert copy.done_ids() == ["00000", "00002"]
    with pytest.raises(StoreNotFoundError, match="not in the bundle"):
        unpack_store(tmp_path / "bundle", str(tmp_path / "other"), drop=["99999"])


def test_an_altered_bundle_or_an_existing_target_is_refused(tmp_path):
    original = _store(tmp_path / "store")
    pack_store(original.uri, tmp_path / "bundle")
    with pytest.raises(StoreCorruptError, match="already holds a store"):
        unpack_store(tmp_path / "bundle", original.uri)
    features = tmp_path / "bundle" / "features" / "00001.parquet"
    data = bytearray(features.read_bytes())
    data[-100] ^= 1
    features.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match="checksum"):
        unpack_store(tmp_path / "bundle", str(tmp_path / "copy"))
