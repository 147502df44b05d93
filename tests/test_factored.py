"""The factored (LoGra) path against exact per-sample gradients projected by the same maps."""

from __future__ import annotations

import pytest
import torch
from helpers import concept_utility_case, factored_inputs, projected_reference, random_images

from ctrak.attribution import Attributor
from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig
from ctrak.errors import ConfigError
from ctrak.factored import FactoredProjector, factored_grads
from ctrak.gradients import masked_positions, per_sample_grads
from ctrak.losses import TRAINING_LOSSES, UTILITY_LOSSES

CASES = [("pixel", ()), ("latent", ("attn2",)), ("latent", ("down_blocks.1",))]


@pytest.mark.parametrize("loss", ["concept-trak", "trak", "das", "utility"])
@pytest.mark.parametrize(("layout", "filters"), CASES)
def test_factored_equals_projected_exact_gradients(
    loss, layout, filters, pixel_model64, latent_model64
):
    model = pixel_model64 if layout == "pixel" else latent_model64
    params = model.attributed_parameters(filters)
    projector = FactoredProjector(model.unet, params, k=64, seed=3, k_side=4)
    assert {layer.kind for layer in projector.layers} >= {"linear"}
    inp = factored_inputs(model)
    fn = UTILITY_LOSSES["concept"] if loss == "utility" else TRAINING_LOSSES[loss]
    term = fn(inp)
    fast, sq = factored_grads(
        model.eps, projector, term.objective, inp.x_t, inp.t, inp.cond, term.target
    )
    exact = per_sample_grads(
        model.eps, params, term.objective, inp.x_t, inp.t, inp.cond, term.target
    )
    torch.testing.assert_close(sq, exact.pow(2).sum(1), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        fast, projected_reference(projector, params, exact), rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize("loss", ["concept-trak", "utility"])
@pytest.mark.parametrize(("layout", "filters"), CASES)
def test_dense_layers_enter_whole(loss, layout, filters, pixel_model64, latent_model64):
    """dense_below at the median layer size: the small layers' slices of the output are their
    exact per-sample gradients, the others stay factored; the norms stay exact."""
    model = pixel_model64 if layout == "pixel" else latent_model64
    params = model.attributed_parameters(filters)
    sizes = sorted(
        layer.d_out * layer.d_in for layer in FactoredProjector(model.unet, params, 8).layers
    )
    cut = sizes[len(sizes) // 2]
    projector = FactoredProjector(model.unet, params, k=64, seed=3, k_side=4, dense_below=cut)
    dense = {layer.name for layer in projector.layers if layer.dense}
    assert dense == {layer.name for layer in projector.layers if layer.d_out * layer.d_in <= cut}
    assert 0 < len(dense) < len(projector.layers)
    assert dense.isdisjoint(projector.factors)
    inp = factored_inputs(model)
    term = (UTILITY_LOSSES["concept"] if loss == "utility" else TRAINING_LOSSES[loss])(inp)
    fast, sq = factored_grads(
        model.eps, projector, term.objective, inp.x_t, inp.t, inp.cond, term.target
    )
    exact = per_sample_grads(
        model.eps, params, term.objective, inp.x_t, inp.t, inp.cond, term.target
    )
    assert fast.shape[1] == sum(layer.dim for layer in projector.layers) == projector.dim
    torch.testing.assert_close(sq, exact.pow(2).sum(1), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        fast, projected_reference(projector, params, exact), rtol=1e-7, atol=1e-9
    )


def test_every_layer_dense_is_the_dense_jl_of_exact_gradients(pixel_model64):
    """dense_below >= every layer: no factors, M = D, and the layer vector is the exact
    gradient regrouped per layer, so the features are its dense JL projection."""
    params = pixel_model64.attributed_parameters(("down_blocks.1",))
    projector = FactoredProjector(pixel_model64.unet, params, k=32, seed=2, dense_below=10**9)
    assert not projector.factors
    assert projector.dim == sum(p.numel() for p in params.values())
    inp = factored_inputs(pixel_model64)
    term = TRAINING_LOSSES["trak"](inp)
    fast, _ = factored_grads(
        pixel_model64.eps, projector, term.objective, inp.x_t, inp.t, inp.cond, term.target
    )
    exact = per_sample_grads(
        pixel_model64.eps, params, term.objective, inp.x_t, inp.t, inp.cond, term.target
    )
    torch.testing.assert_close(fast.pow(2).sum(1), exact.pow(2).sum(1), rtol=1e-8, atol=0)
    torch.testing.assert_close(
        fast, projected_reference(projector, params, exact), rtol=1e-7, atol=1e-9
    )


def test_dense_below_is_validated_and_recorded():
    with pytest.raises(ConfigError, match="dense_below=-1"):
        ProjectionConfig(dense_below=-1)
    assert "projection_dense_below" not in AttributionConfig().provenance()  # older stores
    config = AttributionConfig(projection=ProjectionConfig(dense_below=4096))
    assert config.provenance()["projection_dense_below"] == 4096


def test_all_parameter_layers_are_covered(pixel_model64):
    params = pixel_model64.attributed_parameters()
    projector = FactoredProjector(pixel_model64.unet, params, k=32)
    kinds = {layer.kind for layer in projector.layers}
    assert kinds == {"linear", "conv", "norm"}
    covered = sum(p.numel() for p in params.values())
    assert covered == sum(p.numel() for p in pixel_model64.unet.parameters())


def test_factored_projection_preserves_geometry_like_dense_jl(pixel_model):
    """Both paths project the same summed gradients; the factored one distorts inner products
    no more than a dense JL projection of the same k (checked against unprojected gradients)."""
    images = random_images(12, seed=8)
    captions = ["a red triangle", "a blue circle", "a red circle", "a blue triangle"] * 3
    gradient = GradientConfig(timesteps=(299, 599), params=())  # every layer kind: conv, norm, ...

    def attributor(path):
        projection = ProjectionConfig(k=512, path=path, k_side=16)
        return Attributor(pixel_model, AttributionConfig(gradient=gradient, projection=projection))

    exact = attributor("exact")
    x0, cond = pixel_model.images_to_x0(images), pixel_model.encode_prompts(captions)
    full, _ = exact._summed_gradients(
        exact.states(x0, cond), x0, cond, TRAINING_LOSSES["concept-trak"]
    )  # (12, D) unprojected

    def cosines(f):
        unit = torch.nn.functional.normalize(f.double(), dim=1)
        return (unit @ unit.T)[~torch.eye(12, dtype=torch.bool)]

    truth = cosines(full)
    error = {
        path: (cosines(attributor(path).featurize(images, captions, batch_size=6)) - truth)
        .abs()
        .mean()
        for path in ("exact", "factored")
    }
    assert error["factored"] < 1.5 * error["exact"], error
    assert error["factored"] < 3 / 512**0.5, error  # a few times the JL scale 1/sqrt(k)


def test_split_module_filter_is_refused(pixel_model64):
    params = {n: p for n, p in pixel_model64.unet.named_parameters() if n == "conv_out.weight"}
    with pytest.raises(ConfigError, match="splits module conv_out"):
        FactoredProjector(pixel_model64.unet, params, k=8)


def test_fused_dps_forward_equals_separate_passes(latent_model64):
    """The DPS direction and the parameter gradient from one forward == the two-pass path."""
    model = latent_model64
    params = model.attributed_parameters(("attn2",))
    projector = FactoredProjector(model.unet, params, k=16, seed=1, k_side=4)
    inp = factored_inputs(model)
    term = TRAINING_LOSSES["concept-trak"](inp)
    separate = factored_grads(
        model.eps, projector, term.objective, inp.x_t, inp.t, inp.cond, term.target
    )
    fused = factored_grads(
        model.eps, projector, None, inp.x_t, inp.t, inp.cond, None, dps=(inp.x0, inp.abar_t)
    )
    for a, b in zip(fused, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layout", ["pixel", "latent"])
def test_concept_token_masks_alike_on_both_paths(layout, pixel_model64, latent_model64):
    """query.concept_tokens: the factored path masks the text layers' output-gradients, the
    exact path detaches the unmarked positions' outputs; both give the same projected
    gradient and norm, the text layers' marked and unmarked positions add up to their whole
    gradient, and only the text key/value layers change."""
    model = pixel_model64 if layout == "pixel" else latent_model64
    params, projector, inp, term, mask = concept_utility_case(model)
    assert mask.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]  # <bos> a red triangle <eos> <pad>...
    masks = dict.fromkeys(model.text_layer_names(), mask)
    args = (model.eps, params, term.objective, inp.x_t, inp.t, inp.cond, term.target)
    with masked_positions(model.unet, masks):
        exact = per_sample_grads(*args)
    with masked_positions(model.unet, {name: 1 - mask for name in masks}):
        rest = per_sample_grads(*args)
    full = per_sample_grads(*args)
    fast, sq = factored_grads(
        model.eps, projector, term.objective, inp.x_t, inp.t, inp.cond, term.target, masks=masks
    )
    torch.testing.assert_close(sq, exact.pow(2).sum(1), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        fast, projected_reference(projector, params, exact), rtol=1e-7, atol=1e-9
    )
    text = torch.cat(
        [torch.full((p.numel(),), name.rsplit(".", 1)[0] in masks) for name, p in params.items()]
    )
    assert text.any() and not text.all()
    torch.testing.assert_close(exact[:, text] + rest[:, text], full[:, text], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(exact[:, ~text], full[:, ~text], rtol=0, atol=0)
    assert (exact[:, text] - full[:, text]).abs().max() > 1e-3 * full[:, text].abs().max()
