"""Projected per-sample gradients without forming them (the LoGra factorisation).

For a linear map y_s = W a_s (+ b) applied at positions s (tokens, pixels), the per-sample
gradient is a sum of outer products, G_i = sum_s delta_{i,s} a_{i,s}^T with delta = dL/dy. Its
projection by per-layer random matrices P_out (d_out, k_out), P_in (d_in, k_in) factorises:

    P_out^T G_i P_in = sum_s (P_out^T delta_{i,s}) (P_in^T a_{i,s})^T          (k_out, k_in)

so one batched forward with hooks (inputs a) and one backward to the layer outputs (delta)
give every sample's projected gradient at the cost of the backward pass itself. Bias is the
column of a constant input 1; Conv2d is a linear map on unfolded patches. The exact squared
norm ||G_i||^2 = sum_{s,s'} (delta_s . delta_s')(a_s . a_s') (or the materialised layer
gradient, whichever is cheaper) keeps the per-timestep normalisation exact. GroupNorm and
LayerNorm affine parameters (few) are projected densely from their exact per-sample gradients
(g_gamma = sum_s delta_s * xhat_s, g_beta = sum_s delta_s).

The layer projections are concatenated (M = sum_l m_l) and mapped to k by a dense seeded JL
projection (`ctrak.projection.Projector`). The composite is a fixed linear map of the full
gradient, so scores are those of exact gradients under that projection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ctrak.errors import ConfigError
from ctrak.losses import dps_direction_approx, dps_from_graph
from ctrak.numerics import upcast
from ctrak.projection import Projector
from ctrak.seeds import generator


@dataclass
class Layer:
    """One module whose parameters are attributed. d_in counts the bias column."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv" | "norm"
    d_out: int
    d_in: int
    k_out: int
    k_in: int
    dense: bool = False  # passed whole (d_out * d_in dims) to the global projection

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in


def _rademacher(rows: int, cols: int, seed: int, *index) -> torch.Tensor:
    gen = generator(seed, "factored", *index)
    return (torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.int8).float() * 2 - 1) / (
        cols**0.5
    )


def select_layers(
    unet: nn.Module, params: dict[str, torch.Tensor], k_side: int, dense_below: int = 0
) -> list[Layer]:
    """The modules owning `params`, in parameter order. A module must be attributed whole.
    Modules with at most `dense_below` parameters (d_out * d_in) are marked dense."""
    chosen = set(params)
    layers, seen = [], set()
    for name, module in unet.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        picked = [p for p in own if p in chosen]
        if not picked:
            continue
        if len(picked) != len(own):
            raise ConfigError(f"parameter filter splits module {name}: select all of {own}")
        seen.update(picked)
        bias = int(getattr(module, "bias", None) is not None)
        if isinstance(module, nn.Linear):
            kind, d_out, d_in = "linear", module.out_features, module.in_features + bias
        elif isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros":
                raise ConfigError(f"conv {name}: groups/padding_mode unsupported by factored path")
            kh, kw = module.kernel_size
            kind, d_out, d_in = "conv", module.out_channels, module.in_channels * kh * kw + bias
        elif isinstance(module, nn.GroupNorm | nn.LayerNorm):
            numel = sum(p.numel() for p in module.parameters(recurse=False))
            kind, d_out, d_in = "norm", numel, 1
        else:
            raise ConfigError(
                f"module {name} ({type(module).__name__}) is not supported by the factored "
                "gradient path; use projection path='exact' or filter it out"
            )
        dense = d_out * d_in <= dense_below
        if dense:
            k_out, k_in = d_out, d_in
        elif kind == "norm":
            k_out, k_in = min(d_out, k_side * k_side), 1
        else:
            k_out, k_in = min(d_out, k_side), min(d_in, k_side)
        layers.append(Layer(name, module, kind, d_out, d_in, k_out, k_in, dense))
    assert seen == chosen, "every selected parameter belongs to a selected module"
    return layers


class FactoredProjector:
    """Per-layer factors P_out, P_in (from derived seeds) and the global (M -> k) projection.

    Layers with at most `dense_below` parameters skip their factors: their per-sample gradient
    is formed (cheap for a small layer) and enters the global projection whole, which is then
    a dense JL projection of it. A Kronecker factor pair sketches a low-rank gradient (a layer
    applied at few positions: time embeddings, text keys and values) with a relative variance
    of about 4 / k_side against 2 / (k_side^2) for a dense sketch of the same size."""

    def __init__(
        self,
        unet: nn.Module,
        params: dict[str, torch.Tensor],
        k: int,
        seed: int = 0,
        kind: str = "rademacher",
        k_side: int = 16,
        dense_below: int = 0,
    ) -> None:
        if not isinstance(k_side, int) or k_side <= 0:
            raise ConfigError(f"layer k_side={k_side!r} must be a positive integer")
        self.layers = select_layers(unet, params, k_side, dense_below)
        self.seed = seed
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in self.layers:
            if layer.dense:
                continue
            p_out = _rademacher(layer.d_out, layer.k_out, seed, layer.name, "out")
            p_in = _rademacher(layer.d_in, layer.k_in, seed, layer.name, "in")
            self.factors[layer.name] = (p_out, p_in)
        self.global_projector = Projector(
            [(layer.name, layer.dim) for layer in self.layers], k, seed, kind
        )
        self.dim = self.global_projector.dim  # M

    @property
    def layout_hash(self) -> str:
        return self.global_projector.layout_hash

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """Concatenated layer projections (B, M) -> features (B, k)."""
        return self.global_projector.project(g)

    def project_layer(self, name: str, G: torch.Tensor) -> torch.Tensor:
        """A materialised layer gradient G (B, d_out, d_in) -> (B, k_out * k_in). For tests."""
        if name not in self.factors:  # a dense layer: whole
            return G.flatten(1)
        p_out, p_in = (f.to(G.device, G.dtype) for f in self.factors[name])
        return torch.einsum("boi,ok,il->bkl", G, p_out, p_in).flatten(1)


@dataclass
class _Capture:
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


@contextmanager
def capture(layers: list[Layer]) -> Iterator[_Capture]:
    """Record each layer's input (detached) and output (made differentiable) in a forward."""
    cap = _Capture({}, {})
    handles = []

    def hook(name: str) -> Callable:
        def fn(module, args, output):
            if name in cap.inputs:
                raise ConfigError(f"module {name} ran twice in one forward (weight sharing)")
            cap.inputs[name] = args[0].detach()
            if not output.requires_grad:  # e.g. to_k/to_v of the text: not a function of x_t
                output = output.detach().requires_grad_(True)
            cap.outputs[name] = output
            return output

        return fn

    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(hook(layer.name)))
        yield cap
    finally:
        for handle in handles:
            handle.remove()


def _rows(layer: Layer, a: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position inputs and output-gradients as (B, S, d_in) and (B, S, d_out)."""
    module, B = layer.module, a.shape[0]
    if layer.kind == "conv":
        a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
        a = a.transpose(1, 2)  # (B, S, C_in kh kw)
        delta = delta.flatten(2).transpose(1, 2)  # (B, S, C_out)
    else:
        a, delta = a.reshape(B, -1, a.shape[-1]), delta.reshape(B, -1, delta.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a, delta


def _norm_grad(layer: Layer, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Exact per-sample gradient of a GroupNorm/LayerNorm's (weight, bias): (B, numel)."""
    module, B = layer.module, x.shape[0]
    if isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(x, module.num_groups, eps=module.eps)
        dims = [d for d in range(x.dim()) if d != 1]
        g_w = (delta * xhat).sum(dims[1:]) if x.dim() > 2 else delta * xhat
        g_b = delta.sum(dims[1:]) if x.dim() > 2 else delta
    else:
        xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        n = len(module.normalized_shape)
        g_w = (delta * xhat).reshape(B, -1, *x.shape[-n:]).sum(1).reshape(B, -1)
        g_b = delta.reshape(B, -1, *x.shape[-n:]).sum(1).reshape(B, -1)
    parts = [g_w] if module.weight is not None else []
    if module.bias is not None:
        parts.append(g_b)
    return torch.cat([p.reshape(B, -1) for p in parts], dim=1)


def layer_projection(
    layer: Layer,
    factors: tuple[torch.Tensor, torch.Tensor] | None,
    a: torch.Tensor,
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(projected gradient (B, k_out * k_in), exact squared norm (B,)) of one layer; a dense
    layer (factors None) gives its whole gradient (B, d_out * d_in)."""
    a, delta = upcast(a), upcast(delta)
    if layer.kind == "norm":
        g = _norm_grad(layer, a, delta)  # (B, numel)
        return (g if factors is None else g @ factors[0].to(g)), g.pow(2).sum(1)
    a, delta = _rows(layer, a, delta)  # (B, S, d_in), (B, S, d_out)
    if factors is None:
        g = torch.einsum("bso,bsi->boi", delta, a).flatten(1)
        return g, g.pow(2).sum(1)
    p_out, p_in = (f.to(a.device, a.dtype) for f in factors)
    S = a.shape[1]
    # 1. project, then contract over positions: sum_s (P_out^T delta_s)(P_in^T a_s)^T
    proj = torch.einsum("bso,bsi->boi", delta @ p_out, a @ p_in).flatten(1)
    # 2. exact ||G||^2 by the cheaper of the position-Gram identity and materialising G
    if S * S * (layer.d_in + layer.d_out) < S * layer.d_in * layer.d_out:
        gram_a = torch.einsum("bsi,bti->bst", a, a)
        gram_d = torch.einsum("bso,bto->bst", delta, delta)
        sq = (gram_a * gram_d).sum((1, 2))
    else:
        sq = torch.einsum("bso,bsi->boi", delta, a).pow(2).sum((1, 2))
    return proj, sq


def factored_grads(
    eps: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor],
    projector: FactoredProjector,
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_t: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    target: torch.Tensor | None,
    dps: tuple | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batched forward + one backward -> (layer-projected grads (B, M), ||g||^2 (B,)).

    `masks` maps a layer name to a (S,) 0/1 mask over its positions (e.g. the text tokens of
    a key/value projection): that layer's gradient then sums only the marked positions.

    Samples are independent in the network (no batch statistics), so the gradient of the
    summed loss w.r.t. a layer output holds each sample's own delta. With dps=(x0, abar_t)
    (or (x0, abar_t, "exact")) the DPS loss is fused into the same forward: v = -grad_x
    ||x0_hat - x0||^2 by a first backward, then dL/d eps = 2 v (L = ||sg[eps - v] - eps||^2)
    by the second; with dps=(x0, abar_t, "approx") v is the closed form without the network
    Jacobian (`ctrak.losses.dps_direction_approx`) and only the second backward runs.
    `objective` and `target` are then unused."""
    mode = dps[2] if dps is not None and len(dps) > 2 else "exact"
    with capture(projector.layers) as cap, torch.enable_grad():
        if dps is None:
            out = eps(x_t.detach(), t, cond.detach())
            roots, cotangents = [objective(out, target).sum()], None
        elif mode == "approx":
            out = eps(x_t.detach(), t, cond.detach())
            v = dps_direction_approx(out, x_t, dps[0], dps[1])
            roots, cotangents = [out], [(2 * v).to(out.dtype)]
        else:
            x = upcast(x_t.detach()).requires_grad_(True)
            out = eps(x, t, cond.detach())
            v = dps_from_graph(out, x, dps[0], dps[1], retain_graph=True)
            roots, cotangents = [out], [2 * v]
        names = list(cap.outputs)
        grads = torch.autograd.grad(
            roots, [cap.outputs[n] for n in names], cotangents, allow_unused=True
        )
    deltas = dict(zip(names, grads, strict=True))
    B, dtype = x_t.shape[0], upcast(x_t).dtype
    sq = torch.zeros(B, dtype=dtype, device=x_t.device)
    parts = []
    for layer in projector.layers:
        delta = deltas.get(layer.name)
        if delta is None:  # the layer did not run, or does not reach the loss: zero gradient
            parts.append(torch.zeros(B, layer.dim, dtype=dtype, device=x_t.device))
            continue
        if masks and layer.name in masks:
            delta = delta * masks[layer.name].to(delta).reshape(1, -1, 1)
        proj, layer_sq = layer_projection(
            layer, projector.factors.get(layer.name), cap.inputs[layer.name], delta
        )
        parts.append(proj)
        sq += layer_sq
    return torch.cat(parts, dim=1), sq
