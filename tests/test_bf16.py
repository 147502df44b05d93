"""bfloat16 models: featurize and query run end to end, the math that must stay float32/64
does, and the model dtype in a store's provenance refuses a query in the other dtype."""

from __future__ import annotations

import pytest
import torch
from helpers import random_images

from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig, GradientConfig, InversionConfig, ProjectionConfig
from ctrak.model import DiffusionModel
from pipeline.errors import ProvenanceMismatchError
from pipeline.store import FeatureStore, check_settings

CAPTIONS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"]


def _config() -> AttributionConfig:
    return AttributionConfig(
        gradient=GradientConfig(timesteps=(299, 599), dps="approx"),
        inversion=InversionConfig(eps_at="current"),
        projection=ProjectionConfig(k=64),
    )


@pytest.fixture(scope="module")
def bf16_model(pixel_model_dir):
    return DiffusionModel.load(pixel_model_dir, dtype=torch.bfloat16)


def test_bf16_featurize_and_query_end_to_end(bf16_model, pixel_model):
    images = random_images(4, seed=6)
    ours = Attributor(bf16_model, _config())
    assert bf16_model.dtype == torch.bfloat16 and ours.provenance()["model_dtype"] == "bfloat16"
    phi, ok = ours.featurize_batch(images, CAPTIONS)
    # the features, their norms and the projection are float32, whatever the model's dtype
    assert ok.all() and phi.dtype == torch.float32 and torch.isfinite(phi).all()
    reference, _ = Attributor(pixel_model, _config()).featurize_batch(images, CAPTIONS)
    cosine = torch.nn.functional.cosine_similarity(phi, reference, dim=1)
    assert (cosine > 0.9).all(), cosine  # bf16 rounding (2^-8), not another feature
    kernel = ours.fit(phi)
    assert (
        kernel.chol.dtype == kernel.K.dtype == torch.float64
    )  # the Gram and its factor in float64
    query = Query("a red triangle", concept="triangle", image=images[:1])
    top = ours.attribute([query], phi, kernel, top_k=2)
    assert top.indices.shape == (1, 2)


def test_store_refuses_a_query_in_the_other_dtype(tmp_path, bf16_model, pixel_model):
    bf16 = Attributor(bf16_model, _config()).provenance()
    fp32 = Attributor(pixel_model, _config()).provenance()
    store = FeatureStore(str(tmp_path / "store"))
    store.open(bf16, "float16", create=True)
    with pytest.raises(ProvenanceMismatchError, match=r"model_dtype.*job\.model_dtype"):
        store.open(fp32, "float16", create=False)
    # the query's check before any model is loaded (pipeline.query / pipeline.ingest)
    settings = {**_config().provenance(), "model_dtype": "float32"}
    with pytest.raises(ProvenanceMismatchError, match="'bfloat16' vs this job 'float32'"):
        check_settings(store.metadata()["provenance"], settings)
    check_settings(store.metadata()["provenance"], {**settings, "model_dtype": "bfloat16"})
