"""The concept's share of the cross-attention in the query gradient (`query.concept_attention`).

In a cross-attention layer with query rows q_s = W_q h_s + b_q, keys k_j, values v_j and
weights w_{s,j} = softmax_j(scale q_s . k_j), the output is y_s = W_o o_s + b_o with
o_s = sum_j w_{s,j} v_j. For a concept at text positions C (mask m_j = 1 for j in C):

    to_out:  dL/dW_o = sum_s delta_s (o_c,s)^T,     o_c,s = sum_{j in C} w_{s,j} v_j
    to_q:    dL/dW_q = sum_s (dq_c,s) h_s^T,        dq_c,s = scale sum_{j in C} dL/dS_{s,j} k_j

where delta_s = dL/dy_s and dL/dS the score gradient, both those of the unchanged network:
the other words' share of the attention gives these two layers no gradient, as
`query.concept_tokens` does for to_k / to_v. The forward is unchanged, and so is the gradient
every other layer receives (each changed term is a sum of a module call and its
weight-detached twin, equal in value, so dL/dh and dL/do stay whole).

`ConceptAttnProcessor` builds that graph with the module calls `attn.to_q(h)` and
`attn.to_out[0](o_c)`, so the factored path's hooks see the inputs above and the exact path
(torch.func over the same modules) differentiates the same graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ctrak.errors import ConfigError
from ctrak.numerics import upcast


def _detached_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """module(x) with no gradient to the module's parameters (the input's gradient kept)."""
    bias = None if module.bias is None else module.bias.detach()
    return F.linear(x, module.weight.detach(), bias)


class ConceptAttnProcessor:
    """A diffusers attention processor for cross-attention whose forward equals the default
    one and whose to_q / to_out parameter gradients take only the concept's share (module
    docstring). `mask` (L,): 1 at the concept's token positions of the conditioning."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or kwargs:
            raise ConfigError(
                "query.concept_attention needs cross-attention on the text condition without "
                "an attention mask or extra arguments; set concept_attention = false"
            )
        if attn.norm_q is not None or attn.norm_k is not None or attn.norm_cross:
            raise ConfigError(
                "query.concept_attention does not support q/k or cross normalisation in the "
                "attention; set concept_attention = false"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            B, C, H, W = hidden_states.shape
            hidden_states = hidden_states.view(B, C, H * W).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        B, S, _ = hidden_states.shape
        q = attn.to_q(hidden_states)  # the module call: its weight gradient is restricted
        q_rest = _detached_linear(attn.to_q, hidden_states)  # equal value, gradient to h only
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        dh = k.shape[-1] // heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(B, -1, heads, dh).transpose(1, 2)  # (B, heads, n, dh)

        q, q_rest, k, v = split(q), split(q_rest), split(k), split(v)
        m = self.mask.to(q.dtype).reshape(1, 1, 1, -1)  # (1, 1, 1, L)
        kt = k.transpose(-1, -2)
        # value q_rest k^T; W_q's gradient only through the concept's columns
        logits = (q_rest @ kt + m * ((q - q_rest) @ kt)) * attn.scale
        w = torch.softmax(upcast(logits), dim=-1).to(q.dtype)  # (B, heads, S, L)
        o = w @ v
        o_c = (w * m) @ v  # the concept tokens' share

        def merge(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(1, 2).reshape(B, S, heads * dh)

        o, o_c = merge(o), merge(o_c)
        out = attn.to_out[0](o_c) + F.linear(o - o_c, attn.to_out[0].weight.detach())
        out = attn.to_out[1](out)
        if four_d:
            out = out.transpose(-1, -2).reshape(B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Name -> every cross-attention module of the UNet (attn2 in SD)."""
    return {n: m for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)}


@contextmanager
def concept_attention(unet: nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """Inside: every cross-attention module runs `ConceptAttnProcessor(mask)`; the modules'
    own processors are restored on exit."""
    modules = cross_attention_modules(unet)
    if not modules:
        raise ConfigError(
            "query.concept_attention needs cross-attention modules in the UNet; "
            "set concept_attention = false"
        )
    before = {name: module.processor for name, module in modules.items()}
    try:
        for module in modules.values():
            module.set_processor(ConceptAttnProcessor(mask))
        yield
    finally:
        for name, module in modules.items():
            module.set_processor(before[name])
