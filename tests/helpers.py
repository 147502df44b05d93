"""Small test helpers shared by the test modules."""

from __future__ import annotations

import torch

from ctrak.factored import FactoredProjector
from ctrak.losses import UTILITY_LOSSES, LossInputs


def random_images(n: int, size: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(n, 3, size, size) images in [-1, 1] from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(dtype)


def factored_inputs(model, t: int = 299, batch: int = 3) -> LossInputs:
    """A batch of float64 loss inputs at timestep t with conditions and negatives."""
    x0 = model.images_to_x0(random_images(batch, seed=4, dtype=torch.float64))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=x0.dtype)
    abar = float(model.alphas_cumprod[t])
    x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
    cond = model.encode_prompts(["a red triangle", "a blue circle", "a red circle"][:batch])
    negative = model.encode_prompts(["a triangle", "a circle", "a circle"][:batch])
    return LossInputs(model.eps, x_t, t, abar, cond, x0, noise, negative)


def projected_reference(projector, params, exact):
    """Split exact (B, D) gradients per layer and apply the layer projections densely."""
    B, offset, pieces = exact.shape[0], 0, {}
    for name, p in params.items():
        pieces[name] = exact[:, offset : offset + p.numel()]
        offset += p.numel()
    out = []
    for layer in projector.layers:
        own = [n for n in params if n.rsplit(".", 1)[0] == layer.name]
        if layer.kind == "norm":
            g = torch.cat([pieces[n] for n in own], dim=1)
            out.append(g if layer.dense else g @ projector.factors[layer.name][0].double())
            continue
        weight = pieces[f"{layer.name}.weight"].reshape(B, layer.d_out, -1)
        bias = pieces.get(f"{layer.name}.bias")
        G = weight if bias is None else torch.cat([weight, bias[:, :, None]], dim=2)
        out.append(projector.project_layer(layer.name, G))
    return torch.cat(out, dim=1)


def concept_utility_case(model):
    """The attn2 parameters, a 4 x 4 factored projector (seed 3), a batch of float64 inputs,
    the concept utility's loss term on them, and the concept "triangle"'s token mask in
    "a red triangle": the setting of the query-side masking tests."""
    params = model.attributed_parameters(("attn2",))
    projector = FactoredProjector(model.unet, params, k=64, seed=3, k_side=4)
    inp = factored_inputs(model)
    term = UTILITY_LOSSES["concept"](inp)
    return params, projector, inp, term, model.concept_token_mask("a red triangle", "triangle")
