"""Query: scatter the solved concept direction over the feature shards, gather the top-k.

    g_q = concept gradient (k,), once per query          (on a worker holding the model)
    x_q = (K + lambda I)^-1 g_q, once per query           (Cholesky of the stored Fisher;
          with query.partial_rest the rest's x_r partialled out, docs/method.md (15))
    I(z_i, q) = x_q^T phi_i                               (per block, map_batches)

Several queries share one pass: x (q, k) goes to every shard. A task scores its shards one
after another (`pipeline.scan.scanner.score_files`: features viewed in place, screened, the
float64 ranking exactly) and the driver merges the tasks' top-k in `ctrak.topk`'s order (exact:
merge of per-part top-k == global top-k).

Every feature shard is read with its done-marker and checked against it (size, sha256, and
the Gram checksum the Fisher was merged from) by the task that scores it: a truncated or
altered shard is a StoreCorruptError naming it, never a silently different answer. Bad
queries (empty prompt, a concept not in the prompt without a negative, k <= 0) fail before
any work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch

from ctrak.attribution import Query, resolve_negative
from ctrak.config import AttributionConfig
from ctrak.errors import ConfigError, ImageShapeError
from ctrak.kernel import solve_query
from pipeline.cluster import cluster_has_gpus, named_errors, remote_call
from pipeline.config import PipelineConfig, StorageConfig
from pipeline.errors import StaleFisherError
from pipeline.faults import scan_stall
from pipeline.featurize import images_to_tensor, load_attributor
from pipeline.fisher import current_kernel
from pipeline.scan.scanner import gather, score_files
from pipeline.store import FeatureStore, check_provenance, check_settings

MAX_SCORE_TASKS = 1024  # shards are scored in at most this many Ray tasks


@dataclass(frozen=True)
class QuerySpec:
    """One query: prompt c, target concept, negative c-, and for local scope the query image
    (S, S, 3) uint8 (`image_path` only labels the report)."""

    prompt: str
    concept: str | None = None
    negative: str | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    image_path: str = ""


@dataclass(frozen=True)
class Hit:
    rank: int
    key: str
    shard: str
    row: int
    score: float
    caption: str
    metadata: dict | None


@dataclass
class QueryResult:
    query: QuerySpec
    hits: list[Hit]

    def to_dict(self) -> dict:
        q = self.query
        spec = {
            "prompt": q.prompt,
            "concept": q.concept,
            "negative": q.negative,
            "image": q.image_path or None,
        }
        return {"query": spec, "hits": [asdict(h) for h in self.hits]}


def load_query_image(path: str) -> np.ndarray:
    """A query image file -> (H, W, 3) uint8. ImageShapeError unless it decodes as RGB (the
    model checks its size); ConfigError when the file is missing."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode != "RGB":
                raise ImageShapeError(f"{path}: image mode is {image.mode}; save it as RGB")
            return np.asarray(image, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ConfigError(f"query image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageShapeError(f"query image {path} does not decode: {err}") from None


def check_specs(specs: list[QuerySpec], config: AttributionConfig, top_k: int) -> None:
    """Fail before any work: no queries, a bad top-k, an empty prompt, a concept that is not
    in its prompt (without a negative), or local scope without an image."""
    if not specs:
        raise ConfigError("no queries: give at least one prompt")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} must be a positive integer, e.g. --top-k 10")
    for spec in specs:
        resolve_negative(spec.prompt, spec.concept, spec.negative)  # PromptError, ...
    if config.query.scope == "local":
        missing = [s.prompt for s in specs if s.image is None]
        if missing:
            raise ConfigError(
                f"local scope needs a query image for {missing}; pass --image PNG, or "
                "--scope global to sample images from the prompt"
            )


def query_gradients(
    model_path: str,
    config: AttributionConfig,
    specs: list[QuerySpec],
    expected: dict,
    dtype: str = "float32",
) -> list[np.ndarray]:
    """[(m, k) float32]: each query's directions, the concept gradient and (under
    `query.partial_rest`) the rest of the prompt's (run as a Ray task)."""
    attributor = load_attributor(model_path, config, dtype)
    check_provenance(expected, attributor.provenance(), where=f"model {model_path}")
    rows = []
    for spec in specs:
        image = None if spec.image is None else images_to_tensor(spec.image[None])
        query = Query(spec.prompt, spec.concept, spec.negative, image)
        rows.append(attributor.query_directions(query).detach().cpu().numpy())
    return rows


def score_shards(
    batch: dict[str, np.ndarray],
    *,
    store_uri: str,
    storage: StorageConfig,
    grams: dict[str, str],
    x: np.ndarray,
    top_k: int,
    shard_index: dict[str, int],
) -> pa.Table:
    """Ray Data fn: shard ids (n,) -> their top-k rows per query (`score_files`). Each shard is
    read through its marker (size + sha256 checked) and must be the one the Fisher was merged
    from (same Gram checksum)."""
    scan_stall()  # fault injection (tests); no-op unset
    store = FeatureStore(store_uri, storage)
    shards = [str(s) for s in batch["shard"]]
    entries = store.entries(shards)

    def verified() -> Iterator[bytes]:
        for shard in shards:
            entry = entries[shard]
            if entry.files["gram"]["sha256"] != grams[shard]:
                raise StaleFisherError(
                    f"shard {shard} of {store_uri} was rewritten after the Fisher was merged; "
                    "run `ctrak reindex` with this store to refresh it"
                )
            yield store.read_file(entry, "features")

    return score_files(verified(), x=x, top_k=top_k, shard_index=shard_index)


def run_queries(
    config: PipelineConfig,
    specs: list[QuerySpec],
    top_k: int | None = None,
    *,
    index: bool = False,
    nprobe: int | None = None,
    rescore: int | None = None,
) -> tuple[list[QueryResult], dict]:
    """Attribute every query against the store; returns (results, run info). Runs inside
    `ray_session`. index=True: through the store's vector index (`pipeline.index_query`:
    nprobe lists, `rescore` candidates per query rescored exactly) instead of the exact scan;
    a stale index is refused (StaleIndexError) before any model work."""
    job = config.job
    job.require("store", "model")
    top_k = job.top_k if top_k is None else top_k
    check_specs(specs, config.attribution, top_k)
    start = time.perf_counter()
    store = FeatureStore(job.store, config.storage.resolved())
    meta = store.metadata()
    settings = {**config.attribution.provenance(), "model_dtype": job.model_dtype}
    check_settings(meta["provenance"], settings)  # before any model is loaded
    # 1. the Fisher of exactly the finished shards (and the index of exactly them)
    kernel, info = current_kernel(store, config.attribution.damping_ratio)
    if index:
        from pipeline.index import require_index
        from pipeline.index_query import check_current, default_rescore, index_scan

        index_info = require_index(store)
        check_current(store, index_info)
    # 2. each query's directions (m, k), once, by a worker whose model matches the store
    directions = remote_call(
        query_gradients,
        job.model,
        config.attribution,
        specs,
        meta["provenance"],
        job.model_dtype,
        num_gpus=1 if cluster_has_gpus() else 0,
    )
    # 3. x = (K + lambda I)^-1 g (the rest's partialled out, docs/method.md (15)), once: (q, k)
    x = torch.stack(
        [solve_query(kernel, torch.from_numpy(np.array(d))) for d in directions]
    ).numpy()
    # 4. scatter x over the feature shards (each verified against its marker); top-k per
    #    block; gather on the driver
    shard_ids = sorted(info["shards"])
    extra: dict = {}
    if index:
        count = rescore or default_rescore(top_k)
        candidates, extra = index_scan(
            store, index_info, x, shard_ids=shard_ids, nprobe=nprobe, rescore=count
        )
    else:
        candidates = _exact_scan(job.store, store, info, x, top_k, shard_ids)
    results = []
    for spec, rows in zip(specs, gather(candidates, len(specs), top_k), strict=True):
        hits = [
            Hit(
                rank=r + 1,
                key=h["key"],
                shard=h["shard"],
                row=int(h["row"]),
                score=float(h["score"]),
                caption=h["caption"],
                metadata=json.loads(h["metadata"]) if h["metadata"] else None,
            )
            for r, h in enumerate(rows)
        ]
        results.append(QueryResult(spec, hits))
    run = {
        "store": job.store,
        "shards": len(shard_ids),
        "rows": info["rows"],
        "lambda": kernel.lam,
        "seconds": time.perf_counter() - start,
        **extra,
    }
    return results, run


def _exact_scan(
    uri: str, store: FeatureStore, info: dict, x: np.ndarray, top_k: int, shard_ids: list[str]
) -> pa.Table:
    """Scatter x (q, k) over every feature shard (`score_shards`, Ray Data) -> the tasks'
    top-k candidates."""
    import ray

    items = [{"shard": s} for s in shard_ids]
    ds = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_SCORE_TASKS))
    ds = ds.map_batches(
        score_shards,
        batch_size=None,
        fn_kwargs={
            "store_uri": uri,
            "storage": store.storage,
            "grams": info["shards"],
            "x": x,
            "top_k": top_k,
            "shard_index": {s: i for i, s in enumerate(shard_ids)},
        },
    )
    with named_errors():
        blocks = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(blocks)
