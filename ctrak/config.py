"""Configuration: one small frozen dataclass per concern, validated when built.

Configs are read by the orchestration code (`ctrak.attribution`, `pipeline/`, `jobs/`); the math
functions take plain tensors and numbers. Defaults are the project's choices, recorded here once:

- gradient timesteps 99, 199, ..., 899 (docs/method.md eq. 4: every 5th state of a 50-step grid,
  the pure-noise state dropped);
- DDIM inversion on a 10-step trailing grid, no guidance (cheapest grid holding those timesteps;
  the benchmark issue's ablation revisits it);
- attributed parameters: the UNet's cross-attention ("attn2"), where the prompt enters - the
  paper's choice for Stable Diffusion, and on the toy benchmark better than all parameters
  (docs/experiments.md); () = all;
- k = 1024, Rademacher projection (2 KB per sample in float16);
- damping ratio r = 1: lambda = r * 0.1 * trace(K) / k, fixed, never tuned per query.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ctrak.errors import ConfigError

Method = Literal["concept-trak", "trak", "d-trak", "das"]
State = Literal["inverted", "noised"]
Scope = Literal["local", "global"]
ProjectionKind = Literal["rademacher", "gaussian"]

DEFAULT_TIMESTEPS: tuple[int, ...] = (99, 199, 299, 399, 499, 599, 699, 799, 899)
DEFAULT_TOP_K = 10  # hits per query: the API's, the job config's and the commands' default


@dataclass(frozen=True)
class MethodPreset:
    """What a method fixes beyond its training loss (`ctrak.losses.TRAINING_LOSSES`): the
    states x_t its gradients are taken at, whether each timestep's gradient is normalised
    before the sum, and the query-side utility (docs/method.md, "Methods")."""

    state: Literal["inverted", "noised"]
    normalize: bool
    utility: Literal["concept", "same"]


# The four methods' presets: Concept-TRAK (DDIM-inverted states, unit norms, the concept
# utility); TRAK and D-TRAK (forward-noised states with fixed shared noise, raw sums, their own
# loss on the query); DAS (noised states, unit norms). Explicit settings override them.
METHOD_PRESETS: dict[str, MethodPreset] = {
    "concept-trak": MethodPreset(state="inverted", normalize=True, utility="concept"),
    "trak": MethodPreset(state="noised", normalize=False, utility="same"),
    "d-trak": MethodPreset(state="noised", normalize=False, utility="same"),
    "das": MethodPreset(state="noised", normalize=True, utility="same"),
}


METHODS: tuple[str, ...] = tuple(METHOD_PRESETS)
DpsMode = Literal["exact", "approx"]
EpsAt = Literal["next", "current"]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


@dataclass(frozen=True)
class InversionConfig:
    """DDIM inversion: `num_steps` on the trailing grid t_j = round(j * T / N) - 1, and CFG
    weight `guidance` (1.0 = conditional only, no unconditional branch). `eps_at`: the step
    out of x_t reads eps(x_t, t_next) ("next", diffusers' DDIMInverseScheduler) or
    eps(x_t, t) ("current"), which the training-side gradient at t shares (one forward for
    both; unguided inversion and the factored path only: `ctrak.shared`)."""

    num_steps: int = 10
    guidance: float = 1.0
    eps_at: EpsAt = "next"

    def __post_init__(self) -> None:
        _check_choice("inversion eps_at", self.eps_at, ("next", "current"))
        if self.num_steps < 1:
            raise ConfigError(f"inversion num_steps={self.num_steps} must be >= 1")
        if self.guidance < 0:
            raise ConfigError(f"inversion guidance={self.guidance} must be >= 0")


@dataclass(frozen=True)
class ProjectionConfig:
    """Random projection to `k` dimensions, regenerated from `seed`.

    path="factored" (default) projects each layer's gradient through k_side x k_side factors
    from its inputs and output-gradients, never forming per-sample gradients, then maps the
    concatenation to k (ctrak.factored); layers with at most `dense_below` parameters skip
    the factors and enter that map whole. path="exact" forms full per-sample gradients with
    torch.func and applies a dense JL projection (the reference)."""

    k: int = 1024
    seed: int = 0
    kind: ProjectionKind = "rademacher"
    path: Literal["factored", "exact"] = "factored"
    k_side: int = 16
    dense_below: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k <= 0:
            raise ConfigError(f"projection k={self.k!r} must be a positive integer (e.g. 1024)")
        _check_choice("projection kind", self.kind, ("rademacher", "gaussian"))
        _check_choice("projection path", self.path, ("factored", "exact"))
        if not isinstance(self.k_side, int) or self.k_side <= 0:
            raise ConfigError(f"projection k_side={self.k_side!r} must be a positive integer")
        if not isinstance(self.dense_below, int) or self.dense_below < 0:
            raise ConfigError(
                f"projection dense_below={self.dense_below!r} must be an integer >= 0 "
                "(layers with at most this many parameters skip their factors; 0: none)"
            )


@dataclass(frozen=True)
class GradientConfig:
    """Which training-side loss, at which states x_t and timesteps, over which parameters.

    `state` and `normalize` default per method (None = the method's own choice): Concept-TRAK
    uses DDIM-inverted states and per-timestep unit norms; TRAK and D-TRAK forward-noised states
    with fixed shared noise and raw sums; DAS noised states with per-timestep unit norms.
    `params` are substrings of UNet parameter names (("attn2",) = cross-attention, the default);
    () = all. `dps`: Concept-TRAK's DPS direction v = -grad_{x_t} ||x0_hat - x0||^2
    through the network ("exact", a backward to x_t) or without its Jacobian ("approx",
    v = -2 (x0_hat - x0) / sqrt(abar_t), no backward: `ctrak.losses.dps_direction_approx`).
    """

    method: Method = "concept-trak"
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    params: tuple[str, ...] = ("attn2",)
    state: State | None = None
    normalize: bool | None = None
    noise_seed: int = 0
    dps: DpsMode = "exact"

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("dps", self.dps, ("exact", "approx"))
        if not self.timesteps:
            raise ConfigError("timesteps must name at least one timestep, e.g. (99, 199, ..., 899)")
        if list(self.timesteps) != sorted(set(self.timesteps)) or self.timesteps[0] < 0:
            raise ConfigError(f"timesteps={self.timesteps} must be increasing and non-negative")
        if self.state is not None:
            _check_choice("state", self.state, ("inverted", "noised"))

    @property
    def resolved_state(self) -> State:
        """`state`, else the method's preset."""
        return self.state if self.state is not None else METHOD_PRESETS[self.method].state

    @property
    def resolved_normalize(self) -> bool:
        """`normalize`, else the method's preset."""
        if self.normalize is not None:
            return self.normalize
        return METHOD_PRESETS[self.method].normalize


@dataclass(frozen=True)
class QueryConfig:
    """Query side. `utility="concept"` is the concept-slider / CFG utility (Concept-TRAK);
    `"same"` is the whole-image query of the baselines (their own training loss on the query).
    Global scope samples `num_draws` images under the prompt with CFG weight `sample_guidance`
    over `sample_steps` DDIM steps, takes each draw's x_t by the training side's DDIM inversion
    (so query and training states come from one map), normalises each draw's gradient and
    averages.

    `concept_tokens=True` restricts the concept utility's gradient of the text key/value
    projections (cross-attention to_k / to_v, the layers applied to the text condition) to
    the positions of the concept's tokens: the forward is unchanged, but those layers'
    parameter gradient sums only over the concept's tokens, not over the whole prompt's (the
    colour word's keys and values in "a red triangle" carry none of "triangle"). It needs a
    named concept; a query whose concept is the whole prompt is not restricted.

    `concept_attention=True` (with `concept_tokens`) carries that into the rest of the
    cross-attention: the query's gradient of `to_out` takes only the concept tokens' share of
    its input (sum over the concept's positions of weight x value) and that of `to_q` only the
    part through the concept's attention scores (`ctrak.attention`); forward unchanged.

    `partial_rest=True` scores a named concept net of the rest of the prompt: with the rest's
    direction g_r (the concept utility of c- against the empty prompt, at the same x_t), the
    solved query x becomes x - beta x_r, beta the least-squares coefficient of the concept's
    training scores on the rest's (`ctrak.kernel.solve_query`), so images that score high for
    what the prompt says besides the concept (the query's colour, for a shape) lose that part."""

    scope: Scope = "local"
    utility: Literal["concept", "same"] | None = None
    num_draws: int = 8
    sample_steps: int = 50
    sample_guidance: float = 3.0
    seed: int = 0
    concept_tokens: bool = False
    concept_attention: bool = False
    partial_rest: bool = False

    def __post_init__(self) -> None:
        _check_choice("scope", self.scope, ("local", "global"))
        if self.utility is not None:
            _check_choice("utility", self.utility, ("concept", "same"))
        if self.num_draws < 1:
            raise ConfigError(f"num_draws={self.num_draws} must be >= 1")
        if self.sample_steps < 1:
            raise ConfigError(f"sample_steps={self.sample_steps} must be >= 1")
        for name in ("concept_tokens", "concept_attention", "partial_rest"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.concept_attention and not self.concept_tokens:
            raise ConfigError(
                "concept_attention=true extends concept_tokens to the attention's to_q / "
                "to_out; set concept_tokens = true as well (or concept_attention = false)"
            )


@dataclass(frozen=True)
class AttributionConfig:
    """Everything that fixes a feature store's meaning (see `provenance`)."""

    gradient: GradientConfig = field(default_factory=GradientConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    damping_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.damping_ratio <= 0:
            raise ConfigError(f"damping_ratio={self.damping_ratio} must be > 0 (default 1.0)")

    @property
    def utility(self) -> Literal["concept", "same"]:
        """`query.utility`, else the method's preset."""
        if self.query.utility is not None:
            return self.query.utility
        return METHOD_PRESETS[self.gradient.method].utility

    @classmethod
    def for_method(cls, method: Method, **gradient: object) -> AttributionConfig:
        """The project's defaults for `method` (its preset resolves state, normalisation and
        utility), with `gradient` overrides on GradientConfig."""
        return cls(gradient=GradientConfig(method=method, **gradient))

    def provenance(self) -> dict[str, object]:
        """The settings a stored feature depends on (query settings excluded): the
        `PROVENANCE` table's values for this config (an entry whose value is OMIT is left
        out: stores written before that option stay valid)."""
        values = ((key, value(self)) for key, (_, value) in PROVENANCE.items())
        return {key: v for key, v in values if v is not OMIT}


OMIT = object()  # a provenance value that is not recorded (the option is at its old default)


def _dense_below(c: AttributionConfig) -> object:
    p = c.projection
    return p.dense_below if p.path == "factored" and p.dense_below > 0 else OMIT


# A store's provenance: key -> (the setting that fixes it, its value in an AttributionConfig).
# `AttributionConfig.provenance` records these; a mismatch names the setting (pipeline.store).
PROVENANCE: dict[str, tuple[str, Callable[[AttributionConfig], object]]] = {
    "method": ("attribution.gradient.method", lambda c: c.gradient.method),
    "timesteps": ("attribution.gradient.timesteps", lambda c: list(c.gradient.timesteps)),
    "params": ("attribution.gradient.params", lambda c: list(c.gradient.params)),
    "state": ("attribution.gradient.state", lambda c: c.gradient.resolved_state),
    "normalize": ("attribution.gradient.normalize", lambda c: c.gradient.resolved_normalize),
    "noise_seed": ("attribution.gradient.noise_seed", lambda c: c.gradient.noise_seed),
    "inversion_steps": ("attribution.inversion.num_steps", lambda c: c.inversion.num_steps),
    "inversion_guidance": ("attribution.inversion.guidance", lambda c: c.inversion.guidance),
    "projection_k": ("attribution.projection.k", lambda c: c.projection.k),
    "projection_seed": ("attribution.projection.seed", lambda c: c.projection.seed),
    "projection_kind": ("attribution.projection.kind", lambda c: c.projection.kind),
    "projection_path": ("attribution.projection.path", lambda c: c.projection.path),
    "projection_k_side": (
        "attribution.projection.k_side",
        lambda c: c.projection.k_side if c.projection.path == "factored" else None,
    ),
    "projection_dense_below": ("attribution.projection.dense_below", _dense_below),
    # issue 19's options, recorded only when set (stores from before stay valid)
    "dps": (
        "attribution.gradient.dps",
        lambda c: (
            c.gradient.dps
            if c.gradient.method == "concept-trak" and c.gradient.dps != "exact"
            else OMIT
        ),
    ),
    "inversion_eps_at": (
        "attribution.inversion.eps_at",
        lambda c: c.inversion.eps_at if c.inversion.eps_at != "next" else OMIT,
    ),
}
# The other keys of a store's provenance (set by `Attributor.provenance` and the store) ->
# the setting that fixes them.
OTHER_PROVENANCE: dict[str, str] = {
    "model": "job.model",
    "model_dtype": "job.model_dtype",
    "feature_dtype": "job.feature_dtype",
    "param_layout": "job.model / attribution.gradient.params",
    "num_params": "job.model / attribution.gradient.params",
    "code_version": "the installed ctrak version",
}
