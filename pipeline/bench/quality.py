"""Quality retention on the synthetic paper world: projected scores vs exact scores.

Exact scores use the default path's gradient definition (DPS loss on DDIM-inverted states,
per-timestep unit norms) with no projection: the exact path's summed full gradients
G (n, D) and g_q (q, D). With n << D the kernel is solved in its dual form,

    g_q^T (G^T G + lam I)^-1 G^T = (G g_q)^T (G G^T + lam I)^-1,   lam = r * 0.1 * trace(G^T G) / D

(the trace heuristic of `ctrak.kernel.damping` taken in the D-dimensional space). Compared
against it, per query: Spearman correlation and top-10 overlap of

- default: the factored projection to k (the features of the speed run);
- dense JL: the same exact gradients through the dense JL projection to the same k;
- dense small layers: the factored path with `ProjectionConfig(dense_below=DENSE_BELOW)`
  (layers of at most that many parameters enter the global JL whole, not through k_side x
  k_side factors; `ctrak.factored`);
- naive: the reference settings (50-step CFG 7.5 inversion, dense JL to naive_k) - another
  gradient definition, so its agreement with `exact` is context, not retention.

Precision@10 of each: a training image is relevant when it has the query's target attribute.
Queries are local: images generated from the prompt, kept when `classify` agrees with it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from ctrak.attribution import Attributor, Query, parameter_layout
from ctrak.config import DEFAULT_TOP_K, AttributionConfig, GradientConfig, ProjectionConfig
from ctrak.kernel import fit_kernel, gram, scores, solve
from ctrak.model import DiffusionModel
from ctrak.numerics import upcast
from ctrak.projection import Projector

QUERIES: tuple[tuple[str, str], ...] = (
    ("a red triangle", "red"),
    ("a red triangle", "triangle"),
    ("a blue circle", "blue"),
    ("a blue circle", "circle"),
)
COLOURS = ("red", "blue", "green", "yellow")
DENSE_BELOW = 4096  # the dense-small-layers path: layers of <= 4096 parameters enter whole


class IdentityProjector:
    """Stands in for the projection on the exact path: project(g (B, D)) = g (B, D)."""

    def __init__(self, layout: Sequence[tuple[str, int]]) -> None:
        self.layout = list(layout)
        self.dim = self.k = sum(n for _, n in self.layout)
        self.layout_hash = "identity"

    def project(self, g: torch.Tensor) -> torch.Tensor:
        return upcast(g)


def exact_scores(G: torch.Tensor, g: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
    """G (n, D), g (q, D) -> scores (q, n) float64 = g (G^T G + lam I)^-1 G^T, dual form."""
    G, g = G.to(torch.float64), g.to(torch.float64)
    A = G @ G.T  # (n, n)
    lam = ratio * 0.1 * float(torch.trace(A)) / G.shape[1]
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    chol = torch.linalg.cholesky(A + lam * eye)
    rhs = G @ g.T  # (n, q) = G g_q
    return torch.cholesky_solve(rhs, chol).T


def kernel_scores(features: torch.Tensor, g: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
    """Projected features (n, k), query gradients (q, k) -> (q, n) via ctrak.kernel."""
    return scores(features, solve(fit_kernel(gram(features), ratio), g))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).to(torch.float64)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (n,) score vectors (continuous scores: no ties)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, m: int = DEFAULT_TOP_K) -> float:
    """|top-m(a) & top-m(b)| / m for (n,) scores."""
    m = min(m, a.shape[0])
    top_a = set(torch.topk(a, m).indices.tolist())
    return len(top_a & set(torch.topk(b, m).indices.tolist())) / m


def precision_at(s: torch.Tensor, relevant: torch.Tensor, m: int = DEFAULT_TOP_K) -> float:
    """Share of relevant rows among the top-m of scores s (n,)."""
    m = min(m, s.shape[0])
    return float(relevant[torch.topk(s, m).indices].float().mean())


def query_images(
    model: DiffusionModel, prompt: str, count: int, candidates: int
) -> tuple[torch.Tensor, int]:
    """`count` images generated from `prompt` (25 DDIM steps, CFG 1: the toy model composes its
    held-out combination there and loses it at CFG >= 2), preferring the ones
    `classify` reads as the prompt's (shape, colour) -> (images, how many matched)."""
    from ctrak.generation import generate_images
    from ctrak.toy.worlds import classify

    *_, colour, shape = prompt.split()
    images = generate_images(model, [prompt] * max(candidates, count), num_steps=25, guidance=1.0)
    uint8 = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    match = [classify(a, "paper") == (shape, colour) for a in uint8]
    order = sorted(range(len(match)), key=lambda i: not match[i])[:count]
    return images[order], sum(match[i] for i in order)


def _full_gradients(
    model: DiffusionModel,
    config: AttributionConfig,
    images: torch.Tensor,
    captions: list[str],
    queries: list[Query],
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`config`'s gradients through the identity projection: (G (n, D), g (q, D)) summed
    full gradients."""
    identity = IdentityProjector(parameter_layout(model, config))
    attributor = Attributor(model, config, projector=identity)
    if images.shape[0]:
        G = attributor.featurize(images, captions, batch_size=batch_size)
    else:
        G = torch.zeros(0, attributor.projector.dim)
    g = torch.stack([attributor.query_gradient(q) for q in queries])
    return G, g


def measure_quality(
    model: DiffusionModel,
    params: tuple[str, ...],
    images: torch.Tensor,
    captions: list[str],
    labels: list[dict],
    default_features: torch.Tensor,
    naive_head: torch.Tensor,
    *,
    batch_size: int,
    naive_k: int,
    query_count: int,
    query_candidates: int,
) -> dict[str, object]:
    """Scores of every path on the same training images and queries, and their agreement.
    `default_features` (n, k) and `naive_head` (the naive features of the first rows, from the
    speed run) are reused; the naive path computes only the remaining rows."""
    from pipeline.bench.speed import default_config, naive_config

    clock: dict[str, float] = {}
    begin = time.perf_counter()
    queries, matched = [], {}
    for prompt in dict.fromkeys(p for p, _ in QUERIES):
        imgs, matched[prompt] = query_images(model, prompt, query_count, query_candidates)
        queries += [Query(prompt, concept=c, image=imgs) for p, c in QUERIES if p == prompt]
    clock["query_images"] = time.perf_counter() - begin

    # 1. default path: stored features, projected query gradients
    begin = time.perf_counter()
    default = Attributor(model, default_config(params))
    g_default = torch.stack([default.query_gradient(q) for q in queries])
    s_default = kernel_scores(default_features, g_default)
    clock["default_queries"] = time.perf_counter() - begin
    begin = time.perf_counter()
    small = Attributor(model, default_config(params, dense_below=DENSE_BELOW))
    features = small.featurize(images, captions, batch_size=batch_size)
    s_small = kernel_scores(features, torch.stack([small.query_gradient(q) for q in queries]))
    clock["dense_small_layers"] = time.perf_counter() - begin

    # 2. exact: the same gradients unprojected; and their dense JL projection to the same k
    begin = time.perf_counter()
    exact_config = AttributionConfig(
        gradient=GradientConfig(params=params), projection=ProjectionConfig(path="exact")
    )
    layout = parameter_layout(model, exact_config)
    G, g = _full_gradients(model, exact_config, images, captions, queries, batch_size)
    s_exact = exact_scores(G, g)
    clock["exact"] = time.perf_counter() - begin
    begin = time.perf_counter()
    k = default.config.projection.k
    both = Projector(layout, k, default.config.projection.seed).project(torch.cat([G, g]))
    s_dense = kernel_scores(both[: G.shape[0]], both[G.shape[0] :])
    clock["dense_jl"] = time.perf_counter() - begin
    del G, g, both

    # 3. naive reference settings: the speed run's rows, then the rest projected in one call
    #    (the same P: a linear map regenerated from the seed)
    begin = time.perf_counter()
    naive = naive_config(params, naive_k)
    h = naive_head.shape[0]
    G, g = _full_gradients(model, naive, images[h:], captions[h:], queries, batch_size)
    both = Projector(layout, naive_k, naive.projection.seed).project(torch.cat([G, g]))
    rest, g_naive = both[: G.shape[0]], both[G.shape[0] :]
    s_naive = kernel_scores(torch.cat([naive_head.to(rest.dtype), rest]), g_naive)
    clock["naive"] = time.perf_counter() - begin
    del G, g, both

    paths = {
        "default": s_default,
        "dense_small": s_small,
        "dense_jl": s_dense,
        "naive": s_naive,
        "exact": s_exact,
    }
    per_query = []
    for i, (prompt, concept) in enumerate(QUERIES):
        key = "colour" if concept in COLOURS else "shape"
        relevant = torch.tensor([label[key] == concept for label in labels])
        row: dict[str, object] = {"prompt": prompt, "concept": concept}
        for name, s in paths.items():
            row[f"p@10_{name}"] = precision_at(s[i], relevant)
            if name != "exact":
                row[f"spearman_{name}"] = spearman(s[i], s_exact[i])
                row[f"top10_overlap_{name}"] = topk_overlap(s[i], s_exact[i])
        per_query.append(row)
    keys = [key for key in per_query[0] if key not in ("prompt", "concept")]
    mean = {key: float(np.mean([row[key] for row in per_query])) for key in keys}
    return {
        "train_samples": int(images.shape[0]),
        "feature_dim_k": k,
        "dense_below": DENSE_BELOW,
        "naive_k": naive_k,
        "query_images_per_prompt": query_count,
        "query_images_matching_prompt": matched,
        "per_query": per_query,
        "mean": mean,
        "seconds": clock,
    }
