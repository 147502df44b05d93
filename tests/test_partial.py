"""`query.partial_rest`: a named concept scored net of the rest of the prompt
(docs/method.md (15)), against a least-squares fit of the training scores and against the
rest's own query gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import random_images

from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig, QueryConfig
from ctrak.errors import ConfigError, NumericsError
from ctrak.kernel import fit_kernel, gram, partial_out, scores, solve, solve_query

CAPTIONS = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"] * 2


def test_partial_out_is_the_least_squares_residual_of_the_training_scores():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    x, x_rest = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    s, s_rest = (phi @ x).numpy(), (phi @ x_rest).numpy()
    beta = np.linalg.lstsq(s_rest[:, None], s, rcond=None)[0][0]  # independent reference
    ours = phi @ partial_out(gram(phi), x, x_rest)
    np.testing.assert_allclose(ours.numpy(), s - beta * s_rest, rtol=1e-10, atol=1e-12)
    assert abs(float(ours @ (phi @ x_rest))) < 1e-9 * float(np.abs(s).sum() * np.abs(s_rest).sum())
    assert abs(beta) > 0.05  # the fit removed something

    kernel = fit_kernel(gram(phi))
    g = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(solve_query(kernel, g[:1]), solve(kernel, g[:1])[0])
    both = solve(kernel, g)
    torch.testing.assert_close(solve_query(kernel, g), partial_out(kernel.K, both[0], both[1]))
    with pytest.raises(ConfigError, match="1 or 2 direction rows"):
        solve_query(kernel, torch.zeros(3, 6, dtype=torch.float64))
    with pytest.raises(NumericsError, match="partial_rest = false"):
        partial_out(kernel.K, x, torch.zeros(6, dtype=torch.float64))


def _config(partial: bool) -> AttributionConfig:
    # forward-noised states: x_t does not depend on the prompt, so the rest's direction can be
    # checked against a query of the rest's prompt on its own
    return AttributionConfig(
        gradient=GradientConfig(params=("attn2",), state="noised"),
        projection=ProjectionConfig(k=64),
        query=QueryConfig(partial_rest=partial),
    )


def test_the_rest_direction_is_the_rest_prompts_own_query(pixel_model):
    image = random_images(1, seed=7)
    on, off = Attributor(pixel_model, _config(True)), Attributor(pixel_model, _config(False))
    named = Query("a red triangle", concept="triangle", image=image)
    rows = on.query_directions(named)
    assert rows.shape == (2, 64)
    torch.testing.assert_close(rows[0], off.query_gradient(named))
    rest = off.query_gradient(Query("a red", image=image))  # c- against the empty prompt
    torch.testing.assert_close(rows[1], rest, rtol=1e-5, atol=1e-7)
    assert (rows[0] - rows[1]).norm() > 0.1 * rows[0].norm()
    # a whole-prompt query has no rest: one row, the plain query
    whole = Query("a red triangle", image=image)
    assert on.query_directions(whole).shape == (1, 64)
    with pytest.raises(ConfigError, match="query_directions"):
        on.query_gradient(named)  # one direction is not the option's answer: a named error


def test_scores_with_the_option_are_the_residual_of_the_concepts_scores(pixel_model):
    images, image = random_images(len(CAPTIONS), seed=3), random_images(1, seed=7)
    on, off = Attributor(pixel_model, _config(True)), Attributor(pixel_model, _config(False))
    features = off.featurize(images, CAPTIONS, batch_size=4)
    kernel = off.fit(features)
    named = Query("a red triangle", concept="triangle", image=image)
    ours = on.scores([named], features, kernel)[0].numpy()
    s = off.scores([named], features, kernel)[0].numpy()
    s_rest = off.scores([Query("a red", image=image)], features, kernel)[0].numpy()
    beta = np.linalg.lstsq(s_rest[:, None], s, rcond=None)[0][0]
    np.testing.assert_allclose(ours, s - beta * s_rest, rtol=1e-4, atol=1e-6 * np.abs(s).max())
    assert np.abs(ours - s).max() > 1e-3 * np.abs(s).max()  # the option changed the scores
    top = on.attribute([named], features, kernel, top_k=3)
    assert top.indices[0].tolist() == np.argsort(-ours, kind="stable")[:3].tolist()
    exact = scores(features, solve_query(kernel, on.query_directions(named))[None])[0]
    np.testing.assert_allclose(exact.numpy(), ours)


def test_partial_rest_must_be_a_bool():
    with pytest.raises(ConfigError, match="partial_rest='yes' must be true or false"):
        QueryConfig(partial_rest="yes")
