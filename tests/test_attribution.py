"""End to end in one process: a planted copy ranks first, the score sign means what the docs
say, global scope runs, and bad queries raise named errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import random_images

from ctrak.attribution import Attributor, Query, resolve_negative
from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig, QueryConfig
from ctrak.errors import ConceptNotInPromptError, ConfigError, ImageShapeError, PromptError
from ctrak.generation import sample
from ctrak.losses import UTILITY_LOSSES, LossInputs

CAPTIONS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"] * 2
PLANT = 5


def _planted_set():
    images = random_images(len(CAPTIONS), seed=11)
    query_image = random_images(1, seed=99)
    images[PLANT] = query_image[0]
    return images, query_image


@pytest.mark.parametrize("method", ["trak", "d-trak", "das", "concept-trak"])
def test_planted_copy_ranks_first_for_whole_image_attribution(method, pixel_model):
    images, query_image = _planted_set()
    cfg = AttributionConfig(
        gradient=GradientConfig(method=method, params=("attn2", "conv_out")),
        projection=ProjectionConfig(k=256),
        query=QueryConfig(utility="same"),  # whole-image: the training loss on the query image
    )
    attributor = Attributor(pixel_model, cfg)
    features = attributor.featurize(images, CAPTIONS, batch_size=4)
    kernel = attributor.fit(features)
    query = Query(CAPTIONS[PLANT], image=query_image)
    s = attributor.scores([query], features, kernel)[0]
    assert s.argmax().item() == PLANT  # the copy is the top proponent ...
    assert s[PLANT] > 0  # ... with a positive score: reversing the sign would rank it last
    assert attributor.attribute([query], features, kernel, top_k=3).indices[0, 0] == PLANT


def test_score_sign_is_the_first_order_effect_of_a_descent_step(pixel_model64):
    """score > 0  <=>  a descent step on z_i lowers the concept loss (strengthens the concept)."""
    model, t = pixel_model64, 499
    cfg = AttributionConfig(
        gradient=GradientConfig(method="concept-trak", timesteps=(t,), params=("attn2",)),
        projection=ProjectionConfig(k=8, path="exact"),  # full, unprojected gradients
    )
    attributor = Attributor(model, cfg)
    images = random_images(6, seed=21, dtype=torch.float64)
    x0 = model.images_to_x0(images)
    cond = model.encode_prompts(["a red triangle", "a blue circle", "a red circle"] * 2)
    from ctrak.losses import TRAINING_LOSSES

    g_train, _ = attributor._summed_gradients(
        attributor.states(x0, cond), x0, cond, TRAINING_LOSSES["concept-trak"]
    )  # (6, D) unit rows
    # the concept "red" in "a red triangle", at the query image's inverted state
    q_x0 = model.images_to_x0(random_images(1, seed=22, dtype=torch.float64))
    q_cond = model.encode_prompts(["a red triangle"])
    q_neg = model.encode_prompts(["a triangle"])
    q_states = attributor.states(q_x0, q_cond)
    g_query, _ = attributor._summed_gradients(
        q_states, q_x0, q_cond, UTILITY_LOSSES["concept"], q_neg
    )
    x_t, noise = q_states[t]
    abar = float(model.alphas_cumprod[t])
    term = UTILITY_LOSSES["concept"](
        LossInputs(model.eps, x_t, t, abar, q_cond, q_x0, noise, q_neg)
    )

    def concept_loss(params):
        return term.objective(model.eps(x_t, t, q_cond, params), term.target).item()

    base = concept_loss(None)
    eta, checked = 1e-3, 0
    for i in range(6):
        s = float(g_query[0] @ g_train[i])  # the score with K = I, unprojected
        step, offset = {}, 0
        for name, p in attributor.params.items():
            step[name] = p - eta * g_train[i, offset : offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        delta = concept_loss(step) - base
        if abs(s) > 1e-3:
            assert (delta < 0) == (s > 0), (i, s, delta)
            checked += 1
    assert checked >= 3


def test_global_scope_and_latent_layout(latent_model64):
    cfg = AttributionConfig(
        gradient=GradientConfig(params=("attn2",)),
        projection=ProjectionConfig(k=32),
        query=QueryConfig(scope="global", num_draws=3, sample_steps=10),
    )
    attributor = Attributor(latent_model64, cfg)
    images = random_images(4, seed=1, dtype=torch.float64)
    features = attributor.featurize(images, CAPTIONS[:4], batch_size=2)
    assert features.shape == (4, 32) and torch.isfinite(features).all()
    g = attributor.query_gradient(Query("a red triangle", concept="red"))
    assert g.shape == (32,) and g.norm() > 0
    again = attributor.query_gradient(Query("a red triangle", concept="red"))
    torch.testing.assert_close(g, again)  # derived seeds: the same draws every time
    top = attributor.attribute(
        [Query("a red triangle", concept="red")], features, attributor.fit(features), top_k=2
    )
    assert top.indices.shape == (1, 2)


def test_global_scope_is_the_local_gradient_of_the_models_own_draws(pixel_model):
    # global scope draws images under the prompt and takes x_t by the same DDIM inversion as
    # the training side (not the sampler's trajectory): it equals a local query over the draws
    query_cfg = QueryConfig(scope="global", num_draws=3, sample_steps=10, sample_guidance=2.0)
    cfg = AttributionConfig(projection=ProjectionConfig(k=16), query=query_cfg)
    ours = Attributor(pixel_model, cfg).query_gradient(Query("a red triangle", concept="red"))
    x0 = sample(pixel_model, ["a red triangle"] * 3, seed=0, num_steps=10, guidance=2.0)
    assert x0.abs().max() <= 1  # pixel x0 is clipped: it is a valid query image as it is
    local = Attributor(pixel_model, replace(cfg, query=QueryConfig()))
    expected = local.query_gradient(Query("a red triangle", concept="red", image=x0))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


def test_resolve_negative():
    assert resolve_negative("a red triangle", "red", None) == "a triangle"
    assert resolve_negative("a red triangle", "a red triangle", None) == ""
    assert resolve_negative("a red triangle", None, None) == ""
    assert resolve_negative("Pikachu in pencil style", "Pikachu", None) == "in pencil style"
    assert resolve_negative("a red triangle", "blue", "a triangle") == "a triangle"
    assert resolve_negative("a reddish triangle", "reddish", None) == "a triangle"


def test_bad_queries_are_named(pixel_model):
    attributor = Attributor(pixel_model, AttributionConfig(projection=ProjectionConfig(k=8)))
    image = random_images(1)
    with pytest.raises(ConceptNotInPromptError, match="negative="):
        attributor.query_gradient(Query("a red triangle", concept="blue", image=image))
    with pytest.raises(ConceptNotInPromptError):
        resolve_negative("a reddish triangle", "red", None)  # words, not substrings
    with pytest.raises(PromptError, match="empty"):
        attributor.query_gradient(Query("  ", image=image))
    with pytest.raises(ImageShapeError, match="32x32"):
        attributor.query_gradient(Query("a red triangle", image=torch.zeros(1, 3, 32, 32)))
    with pytest.raises(ImageShapeError, match="channels"):
        attributor.query_gradient(Query("a red triangle", image=torch.zeros(1, 4, 16, 16)))
    with pytest.raises(ConfigError, match="local scope needs a query image"):
        attributor.query_gradient(Query("a red triangle"))
    with pytest.raises(ConfigError, match="positive integer"):
        ProjectionConfig(k=0)
    with pytest.raises(ConfigError, match="not on the 10-step"):
        Attributor(pixel_model, AttributionConfig(gradient=GradientConfig(timesteps=(100,))))


def test_concept_tokens_restrict_only_a_named_concepts_text_layers(pixel_model):
    """query.concept_tokens: masks for the attributed text key/value layers at the concept's
    tokens; nothing when off, for the whole prompt, or for the baselines' query; a changed
    query gradient; named errors when it cannot apply."""
    on = AttributionConfig(
        projection=ProjectionConfig(k=64), query=QueryConfig(concept_tokens=True)
    )
    attributor = Attributor(pixel_model, on)
    masks = attributor.concept_masks(Query("a red triangle", concept="red triangle"))
    assert sorted(masks) == sorted(pixel_model.text_layer_names())
    assert all(name.endswith(("attn2.to_k", "attn2.to_v")) for name in masks)
    assert [m.tolist() for m in masks.values()] == [[0, 0, 1, 1, 0, 0, 0, 0]] * len(masks)
    assert attributor.concept_masks(Query("a red triangle")) is None
    assert attributor.concept_masks(Query("a red triangle", concept="a red triangle")) is None
    off = Attributor(pixel_model, replace(on, query=QueryConfig()))
    assert off.concept_masks(Query("a red triangle", concept="red")) is None
    same = Attributor(
        pixel_model, replace(on, query=QueryConfig(concept_tokens=True, utility="same"))
    )
    assert same.concept_masks(Query("a red triangle", concept="red")) is None

    query = Query("a red triangle", concept="triangle", image=random_images(1, seed=3))
    g_on, g_off = attributor.query_gradient(query), off.query_gradient(query)
    assert torch.isfinite(g_on).all() and not torch.allclose(g_on, g_off, rtol=0.05)

    no_text = replace(on, gradient=GradientConfig(params=("conv_in",)))
    with pytest.raises(ConfigError, match="to_k / to_v"):
        Attributor(pixel_model, no_text).concept_masks(query)
    with pytest.raises(ConceptNotInPromptError, match="tokens of concept"):
        pixel_model.concept_token_mask("a red triangle", "red circle")
    with pytest.raises(ConfigError, match="true or false"):
        QueryConfig(concept_tokens="yes")
