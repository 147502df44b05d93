"""Concept-TRAK end to end in one process: featurize -> kernel -> query -> top-k.

    phi_i = P^T sum_t normalise(grad_theta L_train(z_i; x_t))          (training side)
    g_q   = P^T mean_draws normalise(sum_t normalise(grad_theta L_q(x_t)))  (query side)
    score = g_q^T (Phi^T Phi + lambda I)^-1 phi_i

A notebook session:

    model = DiffusionModel.load("ctrak/assets/toy-paper")
    attributor = Attributor(model, AttributionConfig())
    features = attributor.featurize(images, captions)
    kernel = attributor.fit(features)
    hits = attributor.attribute([Query("a red triangle", concept="triangle", image=img)],
                                features, kernel, top_k=10)

`Attributor(model, config, projector=P)` takes another projection; `attribute(...,
query_config=QueryConfig(scope="global"))` other query settings on the same features.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

import ctrak
from ctrak.attention import concept_attention
from ctrak.config import DEFAULT_TOP_K, AttributionConfig, QueryConfig
from ctrak.errors import ConceptNotInPromptError, ConfigError, NumericsError, PromptError
from ctrak.factored import FactoredProjector, factored_grads
from ctrak.generation import sample
from ctrak.gradients import masked_positions, normalize_rows, per_sample_grads
from ctrak.inversion import check_on_grid, ddim_invert, forward_noise, guided_eps
from ctrak.kernel import Kernel, fit_kernel, gram, scores, solve_query
from ctrak.losses import (
    DPS_LOSSES,
    TRAINING_LOSSES,
    UTILITY_LOSSES,
    LossInputs,
    dps_approx_loss,
    dps_loss,
)
from ctrak.model import DiffusionModel
from ctrak.projection import Projector
from ctrak.seeds import generator
from ctrak.shared import shared_gradients, shares_forward
from ctrak.tokens import check_query_text
from ctrak.topk import TopK, topk


@dataclass(frozen=True)
class Query:
    """prompt c; concept (None = the whole prompt); negative c- (None = prompt minus concept);
    image (B, 3, H, W) in [-1, 1] for local scope, None for global scope."""

    prompt: str
    concept: str | None = None
    negative: str | None = None
    image: torch.Tensor | None = None


def resolve_negative(prompt: str, concept: str | None, negative: str | None) -> str:
    """c-: the given negative; "" when the concept is the whole prompt (plain CFG direction);
    else the prompt with the concept's words removed. A concept absent from the prompt with no
    negative is an error: there is nothing to subtract."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError("the query prompt is empty; give the prompt the image was made from")
    if negative is not None:
        return negative
    if concept is None or concept.strip() == prompt.strip():
        return ""
    pattern = r"\b" + r"\s+".join(map(re.escape, concept.split())) + r"\b"
    if not concept.strip() or not re.search(pattern, prompt):
        raise ConceptNotInPromptError(
            f"concept {concept!r} does not occur in prompt {prompt!r}; pass negative=... "
            "(the prompt without the concept) or a concept that is part of the prompt"
        )
    return " ".join(re.sub(pattern, " ", prompt).split())


def fixed_noise(seed: int, t: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """The shared noise of timestep t (same for every sample): (C, h, w) float32."""
    return torch.randn(tuple(shape), generator=generator(seed, "noise", t)).to(device)


def parameter_layout(
    model: DiffusionModel, config: AttributionConfig | None = None
) -> list[tuple[str, int]]:
    """[(name, numel), ...] of the attributed parameters, in the order a full gradient (D,)
    lays them out (what a `Projector` is defined over)."""
    params = model.attributed_parameters((config or AttributionConfig()).gradient.params)
    return [(name, t.numel()) for name, t in params.items()]


class Attributor:
    """Holds the model, the attributed parameters and the projection for one configuration.

    `projector` replaces the projection the config describes (e.g. the benchmark's identity
    map or an uncached dense JL): an object with `project(g (B, D)) -> (B, k)`, `dim` (= D,
    the full gradient length, unless it is a `FactoredProjector`), `layout` and
    `layout_hash`."""

    def __init__(
        self,
        model: DiffusionModel,
        config: AttributionConfig | None = None,
        projector: Projector | FactoredProjector | None = None,
    ) -> None:
        self.model = model
        self.config = config or AttributionConfig()
        g, inv = self.config.gradient, self.config.inversion
        if g.resolved_state == "inverted":
            check_on_grid(g.timesteps, inv.num_steps, model.num_train_timesteps)
        if g.timesteps[-1] >= model.num_train_timesteps:
            raise ConfigError(f"timestep {g.timesteps[-1]} >= T={model.num_train_timesteps}")
        self.params = model.attributed_parameters(g.params)
        self.projector = projector if projector is not None else self._configured_projector()
        full = sum(t.numel() for t in self.params.values())
        if not isinstance(self.projector, FactoredProjector) and self.projector.dim != full:
            raise ConfigError(
                f"the projector is defined over {self.projector.dim} parameters but "
                f"{full} are attributed (gradient.params={list(g.params)}); build it over "
                "parameter_layout(model, config)"
            )

    def _configured_projector(self) -> Projector | FactoredProjector:
        """The projection `config.projection` describes, regenerated from its seed."""
        p = self.config.projection
        if p.path == "factored":
            return FactoredProjector(
                self.model.unet, self.params, p.k, p.seed, p.kind, p.k_side, p.dense_below
            )
        layout = [(name, t.numel()) for name, t in self.params.items()]
        return Projector(layout, p.k, p.seed, p.kind)

    # ---- provenance ----------------------------------------------------------------------
    def provenance(self) -> dict[str, object]:
        """What a stored feature depends on: model, settings, parameter layout, code version."""
        return {
            "model": self.model.fingerprint,
            "model_dtype": str(self.model.dtype).removeprefix("torch."),
            **self.config.provenance(),
            "param_layout": self.projector.layout_hash,
            "num_params": self.projector.dim,
            "code_version": ctrak.__version__,
        }

    # ---- states x_t ----------------------------------------------------------------------
    def _eps(self, x: torch.Tensor, t: int, cond: torch.Tensor, params=None) -> torch.Tensor:
        return self.model.eps(x, t, cond, params)

    def states(
        self, x0: torch.Tensor, cond: torch.Tensor
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """x0 (B, C, h, w) -> {t: (x_t, noise)} with x_t = sqrt(abar) x0 + sqrt(1-abar) noise."""
        g, inv, abar = self.config.gradient, self.config.inversion, self.model.alphas_cumprod
        if g.resolved_state == "noised":
            out = {}
            for t in g.timesteps:
                noise = fixed_noise(g.noise_seed, t, x0.shape[1:], x0.device).expand_as(x0)
                out[t] = (forward_noise(x0, noise, float(abar[t])), noise)
            return out
        uncond = self.model.null_condition(x0.shape[0]) if inv.guidance != 1.0 else None
        eps_fn = guided_eps(self.model.eps, cond, uncond, inv.guidance)
        inverted = ddim_invert(eps_fn, x0, abar, inv.num_steps, g.timesteps, eps_at=inv.eps_at)
        return {t: (x_t, _implied_noise(x_t, x0, float(abar[t]))) for t, x_t in inverted.items()}

    # ---- gradients -----------------------------------------------------------------------
    @property
    def training_loss(self) -> Callable:
        """The training-side loss: the method's, with Concept-TRAK's DPS direction per config."""
        g = self.config.gradient
        return DPS_LOSSES[g.dps] if g.method == "concept-trak" else TRAINING_LOSSES[g.method]

    def _summed_gradients(
        self,
        states: dict[int, tuple[torch.Tensor, torch.Tensor]],
        x0: torch.Tensor,
        cond: torch.Tensor,
        loss: Callable,
        negative: torch.Tensor | None = None,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sum over timesteps of (normalised) per-sample gradients and ok (B,): (B, D) full
        gradients on the exact path, (B, M) layer projections on the factored path. `masks`:
        per-layer position masks (see `factored_grads`)."""
        normalize = self.config.gradient.resolved_normalize
        total = torch.zeros(x0.shape[0], self.projector.dim, device=x0.device, dtype=x0.dtype)
        ok = torch.ones(x0.shape[0], dtype=torch.bool, device=x0.device)
        for t, (x_t, noise) in sorted(states.items()):
            abar_t = float(self.model.alphas_cumprod[t])
            inputs = LossInputs(self._eps, x_t, t, abar_t, cond, x0, noise, negative)
            g, sq = self._timestep_gradient(loss, inputs, masks)
            if normalize:
                g, ok_t = normalize_rows(g, sq)
            else:
                ok_t = torch.isfinite(g).all(1)
            ok &= ok_t
            total += g
        return total, ok

    def _timestep_gradient(
        self, loss: Callable, inp: LossInputs, masks: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One timestep: (g (B, D) full gradients, None) on the exact path; (g (B, M) layer
        projections, exact ||g||^2 (B,)) on the factored path."""
        if not isinstance(self.projector, FactoredProjector):
            term = loss(inp)
            with masked_positions(self.model.unet, masks or {}):
                g = per_sample_grads(
                    self._eps, self.params, term.objective, inp.x_t, inp.t, inp.cond, term.target
                )
            return g, None
        if loss in (dps_loss, dps_approx_loss):  # DPS direction and gradient: one forward
            dps = (inp.x0, inp.abar_t, "exact" if loss is dps_loss else "approx")
            return factored_grads(
                inp.eps, self.projector, None, inp.x_t, inp.t, inp.cond, None, dps, masks
            )
        term = loss(inp)
        return factored_grads(
            inp.eps,
            self.projector,
            term.objective,
            inp.x_t,
            inp.t,
            inp.cond,
            term.target,
            masks=masks,
        )

    def _with_query(self, query_config: QueryConfig | None) -> AttributionConfig:
        """The attribution config with `query_config` as its query side (None: unchanged)."""
        return self.config if query_config is None else replace(self.config, query=query_config)

    def concept_masks(
        self, query: Query, query_config: QueryConfig | None = None
    ) -> dict[str, torch.Tensor] | None:
        """Position masks of `QueryConfig.concept_tokens`: the attributed text key/value
        layers -> the concept's token positions; None when off or the concept is the prompt.
        `query_config`: the query settings (default: the attributor's config.query)."""
        cfg = self._with_query(query_config)
        if not cfg.query.concept_tokens or cfg.utility != "concept":
            return None
        if query.concept is None or query.concept.strip() == query.prompt.strip():
            return None
        layers = [name for name in self.model.text_layer_names() if f"{name}.weight" in self.params]
        if not layers:
            raise ConfigError(
                "query.concept_tokens restricts the text key/value projections (cross-attention "
                "to_k / to_v), but none is attributed; attribute them (params = ['attn2']) or "
                "set concept_tokens = false"
            )
        mask = self.model.concept_token_mask(query.prompt, query.concept)
        return dict.fromkeys(layers, mask)

    def featurize_batch(
        self, images: torch.Tensor, captions: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1], captions (B,) -> (phi (B, k) float32, ok (B,) bool).

        Rows with ok = False (NaN/Inf or a zero-norm timestep) hold zeros: never store them."""
        x0 = self.model.images_to_x0(images)
        cond = self.model.encode_prompts(captions, allow_empty=True)
        loss = self.training_loss
        if shares_forward(self.config):  # the inversion's forwards serve the gradients too
            total, ok = shared_gradients(self, x0, cond, loss)
        else:
            total, ok = self._summed_gradients(self.states(x0, cond), x0, cond, loss)
        phi = self.projector.project(total)
        ok &= torch.isfinite(phi).all(1)
        return torch.where(ok[:, None], phi, torch.zeros_like(phi)), ok

    def featurize(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        batch_size: int = 8,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """images (N, 3, H, W), captions (N,) -> Phi (N, k). Raises NumericsError on a bad row."""
        if len(captions) != images.shape[0]:
            raise ConfigError(f"{images.shape[0]} images but {len(captions)} captions")
        parts = []
        for start in range(0, images.shape[0], batch_size):
            phi, ok = self.featurize_batch(
                images[start : start + batch_size], captions[start : start + batch_size]
            )
            if not ok.all():
                bad = [start + int(i) for i in torch.nonzero(~ok).flatten()]
                raise NumericsError(f"rows {bad} have NaN/Inf or zero-norm gradients")
            parts.append(phi.cpu())
            if progress is not None:
                progress(phi.shape[0])
        return torch.cat(parts)

    def query_gradient(self, query: Query, query_config: QueryConfig | None = None) -> torch.Tensor:
        """Query -> g_q (k,) float32: per-draw (or per-image) normalised, then averaged.
        `query_config`: the query settings (scope, draws, ...; default: config.query); the
        training side's settings stay the attributor's. Under `query.partial_rest` a query is
        more than one direction: use `query_directions` and `solve_query` (or `scores`)."""
        q = self._with_query(query_config).query
        if q.partial_rest:
            raise ConfigError(
                "query.partial_rest scores a query with two directions (the concept's and the "
                "rest of the prompt's): take them with Attributor.query_directions and solve "
                "them with ctrak.kernel.solve_query (Attributor.scores does both)"
            )
        return self.query_directions(query, query_config)[0]

    def query_directions(
        self, query: Query, query_config: QueryConfig | None = None
    ) -> torch.Tensor:
        """Query -> (m, k) float32: row 0 the concept's g_q; under `query.partial_rest` with a
        named concept, row 1 the rest of the prompt's g_r (the concept utility of c- against
        the empty prompt at the same states, docs/method.md (15)). Solve with `solve_query`."""
        cfg = self._with_query(query_config)
        q = cfg.query
        negative_text = resolve_negative(query.prompt, query.concept, query.negative)
        check_query_text(self.model, query.prompt, query.concept, negative_text)
        if q.scope == "local":
            if query.image is None:
                raise ConfigError("local scope needs a query image; pass image=... or scope=global")
            x0 = self.model.images_to_x0(query.image)
        cond = self.model.encode_prompts([query.prompt])
        if q.scope == "global":  # draws from the model; their x_t as the training side's
            x0 = sample(
                self.model,
                [query.prompt] * q.num_draws,
                seed=q.seed,
                num_steps=q.sample_steps,
                guidance=q.sample_guidance,
            )
        B = x0.shape[0]
        cond = cond.expand(B, -1, -1)
        negative = self.model.encode_prompts([negative_text], allow_empty=True).expand(B, -1, -1)
        states = self.states(x0, cond)
        if cfg.utility == "concept":
            loss = UTILITY_LOSSES["concept"]
        else:
            loss = self.training_loss
        masks = self.concept_masks(query, q)
        share = nullcontext()
        if masks and q.concept_attention:  # masks: a named concept on the concept utility
            share = concept_attention(self.model.unet, next(iter(masks.values())))
        with share:
            total, ok = self._summed_gradients(states, x0, cond, loss, negative, masks)
        rows = [
            self._query_direction(total, ok, "the query gradient", "the concept changes nothing")
        ]
        if q.partial_rest and cfg.utility == "concept" and negative_text:
            null = self.model.encode_prompts([""], allow_empty=True).expand(B, -1, -1)
            total, ok = self._summed_gradients(states, x0, negative, loss, null)
            rows.append(
                self._query_direction(
                    total,
                    ok,
                    f"the rest of the prompt ({negative_text!r})'s gradient",
                    "the rest of the prompt changes nothing; set query.partial_rest = false",
                )
            )
        return torch.stack(rows)

    def _query_direction(
        self, total: torch.Tensor, ok: torch.Tensor, what: str, why: str
    ) -> torch.Tensor:
        """Summed per-draw gradients (B, D or M) -> the projected mean of their units (k,)."""
        if not ok.all():
            raise NumericsError(f"{what} is NaN/Inf or zero at some timestep")
        unit, ok = normalize_rows(total)
        if not ok.all():
            raise NumericsError(f"{what} is zero: {why}")
        return self.projector.project(unit.mean(0, keepdim=True))[0]

    # ---- kernel and scores ---------------------------------------------------------------
    def fit(self, features: torch.Tensor) -> Kernel:
        """Phi (n, k) -> the damped, factorised kernel."""
        return fit_kernel(gram(features), self.config.damping_ratio)

    def solved_query(
        self, query: Query, kernel: Kernel, query_config: QueryConfig | None = None
    ) -> torch.Tensor:
        """Query -> x (k,) float64 = (K + lambda I)^-1 g_q, the rest partialled out under
        `query.partial_rest` (`query_directions` solved by `solve_query`)."""
        return solve_query(kernel, self.query_directions(query, query_config).cpu())

    def scores(
        self,
        queries: Sequence[Query],
        features: torch.Tensor,
        kernel: Kernel,
        query_config: QueryConfig | None = None,
    ) -> torch.Tensor:
        """Queries (q,), Phi (n, k) -> (q, n) float64 influence scores (`query_config` as in
        `query_gradient`)."""
        x = torch.stack([self.solved_query(q, kernel, query_config) for q in queries])
        return scores(features, x)

    def attribute(
        self,
        queries: Sequence[Query],
        features: torch.Tensor,
        kernel: Kernel,
        top_k: int = DEFAULT_TOP_K,
        query_config: QueryConfig | None = None,
    ) -> TopK:
        """-> TopK with values/indices (q, top_k), descending score (`query_config` as in
        `query_gradient`)."""
        return topk(self.scores(queries, features, kernel, query_config), top_k)


def _implied_noise(x_t: torch.Tensor, x0: torch.Tensor, abar_t: float) -> torch.Tensor:
    return (x_t - abar_t**0.5 * x0) / (1 - abar_t) ** 0.5
