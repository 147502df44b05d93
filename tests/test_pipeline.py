"""The Ray pipeline against a real S3 server (SeaweedFS) and one shared local Ray cluster:

- featurize + query give the single-process engine's top-k, scores within 1e-4;
- a rerun does no work and changes no file;
- adding a shard reindexes only that shard, and the Fisher equals featurizing all at once;
- a store made with another projection seed is refused with a named error.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig
from ctrak.kernel import gram
from ctrak.model import DiffusionModel
from ctrak.toy.world_shards import generate_world, read_samples
from pipeline.cluster import named_errors, ray_session
from pipeline.config import JobConfig, PipelineConfig, RayConfig
from pipeline.errors import ProvenanceMismatchError
from pipeline.feature_file import table_features
from pipeline.featurize import Featurizer, images_to_tensor
from pipeline.fisher import current_kernel
from pipeline.ingest import build_dataset, ingest
from pipeline.query import QuerySpec, run_queries
from pipeline.shards import list_shards
from pipeline.store import FeatureStore

ATTRIBUTION = AttributionConfig(
    gradient=GradientConfig(timesteps=(499, 899)), projection=ProjectionConfig(k=32)
)
BUCKET = "s3://ctrak-test"


@pytest.fixture(scope="module")
def world(s3_storage, ray_cluster):
    """12 images of the paper world (16 x 16) in 3 shards on S3, and their rows."""
    data = f"{BUCKET}/paper"
    generate_world(
        "paper",
        data,
        num_images=12,
        image_size=16,
        shard_size=4,
        seed=0,
        storage_options=s3_storage.s3fs_options(),
    )
    return data, list(read_samples(data, s3_storage.s3fs_options()))


def _config(model_dir, storage, data, store, **job) -> PipelineConfig:
    return PipelineConfig(
        job=JobConfig(data=data, store=store, model=str(model_dir), batch_size=4, **job),
        storage=storage,
        ray=RayConfig(progress=False),
        attribution=ATTRIBUTION,
    )


def _listing(store: FeatureStore) -> dict[str, tuple]:
    store.fs.invalidate_cache()
    return {
        p: (i["size"], i.get("ETag"), str(i.get("LastModified")))
        for p, i in store.fs.find(store.root, detail=True).items()
    }


def _queries(rows) -> list[QuerySpec]:
    return [
        QuerySpec(rows[5]["caption"], concept=rows[5]["labels"]["colour"], image=rows[5]["image"]),
        QuerySpec("a red circle", concept="circle", image=rows[2]["image"]),
    ]


@pytest.fixture(scope="module")
def full_store(world, pixel_model_dir, s3_storage):
    """The world featurized in one run into a float32 store on S3."""
    data, _ = world
    config = _config(
        pixel_model_dir, s3_storage, data, f"{BUCKET}/stores/full", feature_dtype="float32"
    )
    with ray_session(config.ray):
        summary = ingest(config, create=True, progress=False)
    return config, summary


def test_featurize_and_query_match_the_single_process_engine(full_store, world, pixel_model_dir):
    config, summary = full_store
    _, rows = world
    assert (summary.shards, summary.written, summary.rows, summary.rejected) == (3, 3, 12, 0)
    store = FeatureStore(config.job.store, config.storage)
    assert store.done_ids() == ["00000", "00001", "00002"]
    assert store.metadata()["provenance"]["projection_seed"] == 0
    specs = _queries(rows)
    with ray_session(config.ray):
        results, info = run_queries(config, specs, top_k=5)
    assert info["rows"] == 12 and info["shards"] == 3
    # the engine in this process on the same rows, in key (= shard, row) order
    attributor = Attributor(DiffusionModel.load(pixel_model_dir), ATTRIBUTION)
    images = images_to_tensor(np.stack([r["image"] for r in rows]))
    features = attributor.featurize(images, [r["caption"] for r in rows], batch_size=4)
    stored = torch.cat(
        [torch.from_numpy(table_features(store.read_features(e))) for e in store.entries().values()]
    )
    torch.testing.assert_close(stored, features, rtol=1e-4, atol=1e-5)
    kernel = attributor.fit(features)
    queries = [Query(s.prompt, s.concept, image=images_to_tensor(s.image[None])) for s in specs]
    expected = attributor.attribute(queries, features, kernel, top_k=5)
    keys = [r["key"] for r in rows]
    for j, result in enumerate(results):
        assert [h.key for h in result.hits] == [keys[i] for i in expected.indices[j]]
        np.testing.assert_allclose([h.score for h in result.hits], expected.values[j], atol=1e-4)
        top = result.hits[0]
        assert top.caption == rows[keys.index(top.key)]["caption"] and "shape" in top.metadata


def test_engine_calls_hold_at_most_batch_size_rows_of_one_shard():
    """Ray Data merges a decode task's yields into blocks by bytes, so an actor's block can
    hold a whole shard (or more): the actor itself must split it into engine calls of at most
    `job.batch_size` rows of ONE shard, grouped by (shard, row // batch_size) - which rows
    share a call is fixed by the data, not by block bytes (docs/faults.md)."""
    batch = {
        "shard": np.array(["00000"] * 5 + ["00001"] * 3),
        "row": np.array([0, 1, 2, 3, 4, 0, 1, 2]),
    }
    good = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    split = Featurizer._engine_batches(SimpleNamespace(batch_size=3), batch, good)
    assert [list(rows) for rows in split] == [[0, 1, 2], [3, 4], [5, 6, 7]]
    # a rejected row (not in `good`) leaves its call's other rows together
    split = Featurizer._engine_batches(SimpleNamespace(batch_size=3), batch, good[good != 1])
    assert [list(rows) for rows in split] == [[0, 2], [3, 4], [5, 6, 7]]


def test_featurize_batches_follow_the_data(world, pixel_model_dir, s3_storage):
    """With batch_size 3 on 4-row shards the engine calls are rows [0:3] and [3:4] of each
    shard: the stored features equal the engine's on exactly those batches (bit for bit when
    Ray keeps a shard in one block, as on an idle machine; within the fault tests' tolerance
    when it splits one under load), never a whole shard in one call."""
    data, rows = world
    two = f"{BUCKET}/two-shards"
    fs = FeatureStore(data, s3_storage).fs
    for shard in ("00000", "00001"):
        fs.copy(f"{data[5:]}/{shard}.tar", f"{two[5:]}/{shard}.tar")
    config = _config(
        pixel_model_dir, s3_storage, two, f"{BUCKET}/stores/batch3", feature_dtype="float32"
    )
    config = dataclasses.replace(config, job=dataclasses.replace(config.job, batch_size=3))
    with ray_session(config.ray):
        assert ingest(config, create=True, progress=False).rows == 8
    store = FeatureStore(config.job.store, s3_storage)
    stored = torch.cat(
        [torch.from_numpy(table_features(store.read_features(e))) for e in store.entries().values()]
    )
    attributor = Attributor(DiffusionModel.load(pixel_model_dir), ATTRIBUTION)
    expected = []
    for shard in (rows[0:4], rows[4:8]):  # per shard: a batch of 3, then a batch of 1
        images = images_to_tensor(np.stack([r["image"] for r in shard]))
        expected.append(attributor.featurize(images, [r["caption"] for r in shard], batch_size=3))
    torch.testing.assert_close(stored, torch.cat(expected), rtol=1e-4, atol=1e-5)


def test_rerun_does_no_work(full_store):
    config, _ = full_store
    store = FeatureStore(config.job.store, config.storage)
    before = _listing(store)
    with ray_session(config.ray):
        summary = ingest(config, create=True, progress=False)
    assert (summary.skipped, summary.written, summary.rows, summary.fisher_grams_added) == (
        3,
        0,
        0,
        0,
    )
    assert _listing(store) == before


def test_adding_a_shard_reindexes_only_that_shard(full_store, world, pixel_model_dir, s3_storage):
    full_config, _ = full_store
    data, _ = world
    grow = f"{BUCKET}/grow"
    fs = FeatureStore(data, s3_storage).fs
    for shard in ("00000", "00001"):
        fs.copy(f"{data.removeprefix('s3://')}/{shard}.tar", f"{grow[5:]}/{shard}.tar")
    config = _config(
        pixel_model_dir, s3_storage, grow, f"{BUCKET}/stores/grow", feature_dtype="float32"
    )
    with ray_session(config.ray):
        assert ingest(config, create=True, progress=False).written == 2
        store = FeatureStore(config.job.store, config.storage)
        before = _listing(store)
        fs.copy(f"{data[5:]}/00002.tar", f"{grow[5:]}/00002.tar")
        summary = ingest(config, create=False, progress=False)  # reindex
    assert (summary.skipped, summary.written, summary.fisher_grams_added) == (2, 1, 1)
    after = _listing(store)
    changed = sorted(p.split("/stores/grow/")[1] for p in after if after[p] != before.get(p))
    assert changed == [
        "done/00002.json",
        "features/00002.parquet",
        "fisher/fisher.json",
        "fisher/kernel.npz",
        "grams/00002.npy",
        "rejects/00002.parquet",
    ]
    kernel, _ = current_kernel(store, 1.0)
    # == the dense Gram of every stored feature (the merge is exact up to float64 rounding)
    stored = torch.cat(
        [torch.from_numpy(table_features(store.read_features(e))) for e in store.entries().values()]
    )
    torch.testing.assert_close(kernel.K, gram(stored), rtol=1e-12, atol=1e-12)
    # == the Fisher of featurizing all three shards in one run (features agree to float32
    # rounding: the engine's batched matmuls depend slightly on batch composition)
    full_kernel, _ = current_kernel(FeatureStore(full_config.job.store, s3_storage), 1.0)
    torch.testing.assert_close(kernel.K, full_kernel.K, rtol=1e-4, atol=1e-6)


def test_store_with_another_projection_seed_is_refused(full_store, world):
    config, _ = full_store
    _, rows = world
    other = AttributionConfig(
        gradient=ATTRIBUTION.gradient, projection=ProjectionConfig(k=32, seed=1)
    )
    config = PipelineConfig(config.job, config.storage, config.ray, other)
    store = FeatureStore(config.job.store, config.storage)
    before = _listing(store)
    with ray_session(config.ray):
        with pytest.raises(ProvenanceMismatchError, match="projection_seed: store 0") as err:
            ingest(config, create=False, progress=False)
        assert "attribution.projection.seed" in str(err.value)
        with pytest.raises(ProvenanceMismatchError, match="projection_seed"):
            run_queries(config, _queries(rows)[:1], top_k=3)
    assert _listing(store) == before


def test_a_worker_with_another_model_refuses_to_featurize(full_store, world, s3_storage):
    """Each featurize actor checks its own model against the store (a node with another copy
    of the model must not write features); the named error reaches the driver."""
    config, _ = full_store
    data, _ = world
    store = FeatureStore(config.job.store, s3_storage)
    expected = {**store.metadata()["provenance"], "model": "0123456789abcdef"}
    ds = build_dataset(
        list_shards(data, s3_storage)[:1],
        config,
        s3_storage,
        {"provenance": expected, "image_size": 16},
    )
    refused = pytest.raises(ProvenanceMismatchError, match="model: store")
    with ray_session(config.ray), refused, named_errors():
        for _ in ds.iter_batches(batch_size=None):
            pass


def test_decoding_is_a_separate_cpu_stage(full_store, world, s3_storage, capsys):
    """Ray fuses map stages with equal resources; decoding must stay out of the actors."""
    config, _ = full_store
    data, _ = world
    ds = build_dataset(
        list_shards(data, s3_storage), config, s3_storage, {"provenance": {}, "image_size": 16}
    )
    ds.explain()
    plan = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[MapBatches(decode_shard)]" in plan
    assert "ActorPoolMapOperator[MapBatches(Featurizer)]" in plan
