"""The named attribution configurations `ctrak eval` compares: the methods at their defaults,
the paper's component ablation, the cost knobs, and the default path vs the naive reference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ctrak.config import AttributionConfig, GradientConfig, InversionConfig, QueryConfig


@dataclass(frozen=True)
class Variant:
    """A named attribution configuration (a method, or one step of the ablation)."""

    name: str
    config: AttributionConfig


def method_variants(methods: Sequence[str], **overrides) -> list[Variant]:
    """One Variant per method with the project's defaults (plus `overrides` on GradientConfig)."""
    return [Variant(m, AttributionConfig.for_method(m, **overrides)) for m in methods]


def ablation_variants() -> list[Variant]:
    """The paper's ablation (docs/method.md section 5), one component added per step:
    denoising loss -> + concept utility -> + DPS training loss -> + DDIM inversion ->
    + per-timestep normalisation (= Concept-TRAK)."""

    def cfg(method: str, state: str, normalize: bool, utility: str) -> AttributionConfig:
        gradient = GradientConfig(method=method, state=state, normalize=normalize)
        return AttributionConfig(gradient=gradient, query=QueryConfig(utility=utility))

    return [
        Variant("DSM (TRAK)", cfg("trak", "noised", False, "same")),
        Variant("+ concept utility", cfg("trak", "noised", False, "concept")),
        Variant("+ DPS training loss", cfg("concept-trak", "noised", False, "concept")),
        Variant("+ DDIM inversion", cfg("concept-trak", "inverted", False, "concept")),
        Variant("+ per-timestep norm", cfg("concept-trak", "inverted", True, "concept")),
    ]


def cost_variants() -> list[Variant]:
    """The cost knobs of Concept-TRAK: inversion steps, guidance during inversion, and the
    number of gradient timesteps (all else default)."""
    out = []
    for steps, guidance in ((10, 1.0), (50, 1.0), (10, 3.0)):
        inversion = InversionConfig(num_steps=steps, guidance=guidance)
        out.append(
            Variant(
                f"inversion {steps} steps, cfg {guidance:g}", AttributionConfig(inversion=inversion)
            )
        )
    for timesteps in ((299, 599, 899), (499,)):
        out.append(
            Variant(
                f"timesteps {','.join(map(str, timesteps))}",
                AttributionConfig(gradient=GradientConfig(timesteps=timesteps)),
            )
        )
    return out


def reference_variants() -> list[Variant]:
    """Concept-TRAK's default path against the benchmark's naive reference (exact per-sample
    gradients, dense JL to k = 2048, 50-step CFG 7.5 inversion: `ctrak bench`'s naive), over
    all parameters (the benchmark's toy section) and over attn2 (its SD-shaped section, and
    the shipped default): the P@10 side of the benchmark's speed-ups."""
    from pipeline.bench.speed import default_config, naive_config

    return [
        Variant("default path, all params", default_config(())),
        Variant("naive reference, all params", naive_config((), 2048)),
        Variant("default path, attn2 (shipped)", AttributionConfig()),
        Variant("naive reference, attn2", naive_config(("attn2",), 2048)),
    ]


def chosen_variants(kind: str, methods: Sequence[str], overrides: Sequence[str]) -> list[Variant]:
    """The `kind` of variants (`methods`: `methods` at their defaults), each with the
    `KEY=VALUE` overrides under `attribution.` applied (checked: unknown keys are refused)."""
    from pipeline.config_file import with_overrides

    made = {
        "methods": lambda: method_variants(methods),
        "ablation": ablation_variants,
        "cost": cost_variants,
        "reference": reference_variants,
    }[kind]()
    return [Variant(v.name, with_overrides(v.config, overrides, "attribution.")) for v in made]
