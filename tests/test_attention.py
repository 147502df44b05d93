"""query.concept_attention: the concept's share of the cross-attention's to_q / to_out
gradient, against the hand formulas of ctrak/attention.py on the unchanged network, on both
gradient paths, with the forward unchanged."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import concept_utility_case, projected_reference, random_images

from ctrak.attention import concept_attention, cross_attention_modules
from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig, ProjectionConfig, QueryConfig
from ctrak.errors import ConfigError
from ctrak.factored import capture, factored_grads
from ctrak.gradients import masked_positions, per_sample_grads


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    B, n, inner = x.shape
    return x.reshape(B, n, heads, inner // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, heads, n, dh = x.shape
    return x.transpose(1, 2).reshape(B, n, heads * dh)


def _with_bias(a: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
    return a if module.bias is None else torch.cat([a, torch.ones_like(a[..., :1])], -1)


def _hand_gradients(model, params, projector, term, inp, mask, full) -> torch.Tensor:
    """(B, D) per-sample gradients of the unchanged network (`full`), with every
    cross-attention's to_q and to_out.0 replaced by the module docstring's formulas from its
    recorded q, k, v, inputs and output-gradients."""
    with capture(projector.layers) as cap, torch.enable_grad():
        out = model.eps(inp.x_t, inp.t, inp.cond)
        names = list(cap.outputs)
        grads = torch.autograd.grad(
            term.objective(out, term.target).sum(), [cap.outputs[n] for n in names]
        )
    delta = dict(zip(names, grads, strict=True))
    pieces, offset = {}, 0
    for name, p in params.items():
        pieces[name] = full[:, offset : offset + p.numel()]
        offset += p.numel()
    B, m = full.shape[0], mask.to(full).reshape(1, 1, 1, -1)
    for name, attn in cross_attention_modules(model.unet).items():
        q, k, v = (cap.outputs[f"{name}.{part}"].detach() for part in ("to_q", "to_k", "to_v"))
        qh, kh, vh = (_heads(x, attn.heads) for x in (q, k, v))
        w = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1)
        o = cap.inputs[f"{name}.to_out.0"]
        torch.testing.assert_close(_merge(w @ vh), o, rtol=1e-9, atol=1e-12)
        d_out = delta[f"{name}.to_out.0"]
        G_out = torch.einsum(
            "bso,bsi->boi", d_out, _with_bias(_merge((w * m) @ vh), attn.to_out[0])
        )
        g = _heads(d_out @ attn.to_out[0].weight, attn.heads)  # dL/do
        gv = g @ vh.transpose(-1, -2)
        d_scores = w * (gv - (w * gv).sum(-1, keepdim=True))
        dq = delta[f"{name}.to_q"]
        torch.testing.assert_close(_merge(d_scores @ kh) * attn.scale, dq, rtol=1e-8, atol=1e-12)
        dq_c = _merge((d_scores * m) @ kh) * attn.scale
        G_q = torch.einsum("bso,bsi->boi", dq_c, _with_bias(cap.inputs[f"{name}.to_q"], attn.to_q))
        for layer, G in (("to_out.0", G_out), ("to_q", G_q)):
            lin = attn.get_submodule(layer)
            pieces[f"{name}.{layer}.weight"] = G[..., : lin.in_features].reshape(B, -1)
            if lin.bias is not None:
                pieces[f"{name}.{layer}.bias"] = G[..., -1]
    return torch.cat([pieces[n] for n in params], dim=1)


@pytest.mark.parametrize("layout", ["pixel", "latent"])
def test_concept_share_on_both_paths_equals_the_hand_formulas(
    layout, pixel_model64, latent_model64
):
    """Exact path (torch.func over the processor) = the hand formulas; factored path = the
    exact one projected; forward unchanged; the processors restored on exit; to_q / to_out
    move, the other layers only by rounding (manual against fused attention); with the concept
    tokens' to_k / to_v masks too, the paths still agree and each restriction moves only its
    own layers."""
    model = pixel_model64 if layout == "pixel" else latent_model64
    params, projector, inp, term, mask = concept_utility_case(model)
    before = {n: m.processor for n, m in cross_attention_modules(model.unet).items()}
    plain = model.eps(inp.x_t, inp.t, inp.cond)
    args = (model.eps, params, term.objective, inp.x_t, inp.t, inp.cond, term.target)
    with concept_attention(model.unet, mask):
        torch.testing.assert_close(model.eps(inp.x_t, inp.t, inp.cond), plain, rtol=1e-10, atol=0)
        exact = per_sample_grads(*args)
        fast, sq = factored_grads(
            model.eps, projector, term.objective, inp.x_t, inp.t, inp.cond, term.target
        )
    assert {n: m.processor for n, m in cross_attention_modules(model.unet).items()} == before
    full = per_sample_grads(*args)
    hand = _hand_gradients(model, params, projector, term, inp, mask, full)
    torch.testing.assert_close(exact, hand, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(sq, exact.pow(2).sum(1), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        fast, projected_reference(projector, params, exact), rtol=1e-7, atol=1e-9
    )
    moved = torch.cat(
        [torch.full((p.numel(),), ".to_q." in n or ".to_out." in n) for n, p in params.items()]
    )
    torch.testing.assert_close(exact[:, ~moved], full[:, ~moved], rtol=1e-8, atol=1e-12)
    assert (exact[:, moved] - full[:, moved]).abs().max() > 1e-2 * full[:, moved].abs().max()
    # with the concept tokens' masks on to_k / to_v as well (the option as the query runs it)
    masks = dict.fromkeys(model.text_layer_names(), mask)
    with concept_attention(model.unet, mask):
        with masked_positions(model.unet, masks):
            both = per_sample_grads(*args)
        fast, sq = factored_grads(
            model.eps, projector, term.objective, inp.x_t, inp.t, inp.cond, term.target, masks=masks
        )
    with masked_positions(model.unet, masks):
        tokens = per_sample_grads(*args)
    torch.testing.assert_close(sq, both.pow(2).sum(1), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        fast, projected_reference(projector, params, both), rtol=1e-7, atol=1e-9
    )
    torch.testing.assert_close(both[:, moved], exact[:, moved], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(both[:, ~moved], tokens[:, ~moved], rtol=1e-8, atol=1e-12)


def test_concept_attention_option(pixel_model):
    """The query option: needs concept_tokens, is a bool, changes a named concept's query
    gradient, leaves a whole-prompt query alone, and leaves the model's processors as found."""
    with pytest.raises(ConfigError, match="set concept_tokens = true"):
        QueryConfig(concept_attention=True)
    with pytest.raises(ConfigError, match="true or false"):
        QueryConfig(concept_tokens=True, concept_attention=1)
    tokens = AttributionConfig(
        projection=ProjectionConfig(k=64), query=QueryConfig(concept_tokens=True)
    )
    share = replace(tokens, query=replace(tokens.query, concept_attention=True))
    on, off = Attributor(pixel_model, share), Attributor(pixel_model, tokens)
    before = {n: m.processor for n, m in cross_attention_modules(pixel_model.unet).items()}
    image = random_images(1, seed=3)
    named = Query("a red triangle", concept="triangle", image=image)
    g_on, g_off = on.query_gradient(named), off.query_gradient(named)
    assert torch.isfinite(g_on).all() and not torch.allclose(g_on, g_off, rtol=0.05)
    whole = Query("a red triangle", image=image)
    torch.testing.assert_close(on.query_gradient(whole), off.query_gradient(whole))
    assert {n: m.processor for n, m in cross_attention_modules(pixel_model.unet).items()} == before
