"""The demo (`ctrak demo`): the production pipeline end to end on the shipped toy model, no
server needed.

1. writes the toy model's own synthetic training set (1,200 images, 30 shards) as WebDataset
   shards in a local folder (the embedded default "object store");
2. per method, a feature store: the shipped one (`ctrak/assets/<model>-stores/<method>`, made
   by `ctrak featurize` over every shard; rows only, `pipeline.bundle`) without its first
   `live_shards` shards, which `reindex` then featurizes live through Ray Data (decode tasks
   -> featurize actors -> Parquet feature shards + partial Grams -> Fisher) on a local Ray
   cluster; the live rows are compared with the shipped ones. A model without shipped stores
   is featurized live from its first `num_train` images;
3. `query` (solve once, scatter over the shards, gather the top-k) for each target concept of
   the held-out prompt ("a red triangle": a combination the model never saw), by default in
   global scope (the model's own draws of the prompt, each taken to x_t by the training
   side's DDIM inversion);
4. prints the top-10 per method and concept with Precision@10 (relevant = the training image
   has the target attribute), writes report.html (+ report.png) and the next command to run.
"""

from __future__ import annotations

import json
import shlex
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

SHARD_SIZE = 40  # images per shard of the shipped stores' training set
GLOBAL_DRAWS = 32  # the model's draws a global query averages (docs/experiments.md)
GUIDANCE = 1.0  # the toy models compose their held-out combinations at CFG 1 (TRAINING.md)


def shipped_bundle(model_dir: Path, method: str) -> Path | None:
    """The shipped store bundle of `method` for the model at `model_dir`, if there is one."""
    bundle = model_dir.parent / f"{model_dir.name}-stores" / method
    return bundle if (bundle / "bundle.json").is_file() else None


def query_images(model, world: str, prompt: str, n: int, work: Path) -> list[Path]:
    """Generate images of `prompt`, keep the first n the world's classifier confirms."""
    from PIL import Image

    from ctrak.generation import generate_images, to_uint8
    from ctrak.toy.worlds import classify, world_combos

    combo = next((c for c in world_combos(world) if c.caption == prompt), None)
    out, kept = work / "queries", []
    out.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        batch = to_uint8(
            generate_images(model, [prompt] * max(n, 4), seed=1234 + attempt, guidance=GUIDANCE)
        )
        for array in batch:
            if combo is None or classify(array, world) == (combo.shape, combo.colour):
                path = out / f"query-{len(kept):02d}.png"
                Image.fromarray(array).save(path)
                kept.append(path)
            if len(kept) == n:
                return kept
    if not kept:  # the model never drew it: show the user what it drew instead
        Image.fromarray(batch[0]).save(out / "query-00.png")
        kept.append(out / "query-00.png")
        print(f"note: no generated image of {prompt!r} was classified as such; using one anyway")
    return kept


def draws_mosaic(model, prompt: str, query_config, rows: int = 3, columns: int = 3) -> np.ndarray:
    """The first rows x columns draws a global query of `prompt` averages, as a grid
    (rows * S, columns * S, 3) uint8: the same seeds, steps and guidance as the query's."""
    from ctrak.generation import sample, to_uint8

    x0 = sample(
        model,
        [prompt] * (rows * columns),
        seed=query_config.seed,
        num_steps=query_config.sample_steps,
        guidance=query_config.sample_guidance,
    )
    tiles = to_uint8(model.x0_to_images(x0))  # (rows * columns, S, S, 3)
    return np.concatenate(
        [np.concatenate(list(tiles[r * columns : (r + 1) * columns]), axis=1) for r in range(rows)]
    )


def live_agreement(store_uri: str, bundle: Path, shards: list[str]) -> float:
    """The smallest cosine between a live-featurized row and the shipped row of that key."""
    from pipeline.feature_file import table_features
    from pipeline.store import FeatureStore

    live, shipped = FeatureStore(store_uri), FeatureStore(str(bundle))
    cosines = []
    for shard in shards:
        a_table = live.read_features(live.entries([shard])[shard])
        b_table = shipped.read_features(shipped.entries([shard])[shard])
        order = {k: i for i, k in enumerate(b_table.column("key").to_pylist())}
        a = table_features(a_table).astype(np.float64)
        b = table_features(b_table).astype(np.float64)
        b = b[[order[k] for k in a_table.column("key").to_pylist()]]
        cosines.append((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    return float(np.concatenate(cosines).min())


def _attribute_of(concept: str, results) -> str:
    hits = (h for r in results for h in r.hits)
    return "shape" if any((h.metadata or {}).get("shape") == concept for h in hits) else "colour"


def print_tables(results: dict, concepts: list[str], top_k: int, scope: str) -> list[dict]:
    """Print the top-k per method and concept with P@k; return them JSON-able."""
    out = []
    for method, method_results in results.items():
        for concept in concepts:
            attribute = _attribute_of(concept, method_results)
            mine = [r for r in method_results if r.query.concept == concept]
            marks = [[(h.metadata or {}).get(attribute) == concept for h in r.hits] for r in mine]
            p = float(np.mean([np.mean(m) for m in marks]))
            over = "the model's draws" if scope == "global" else f"{len(mine)} query image(s)"
            print(f"\n{method}  target={concept!r}  P@{top_k}={p:.2f}  (over {over})")
            print(f"  {'rank':>4}  {'score':>10}  {'key':<9}  * = has {concept!r}  caption")
            for h, mark in zip(mine[0].hits, marks[0], strict=True):
                print(
                    f"  {h.rank:>4}  {h.score:>10.4g}  {h.key:<9}  {'*' if mark else ' '}"
                    f"  {h.caption}"
                )
            out.append(
                {
                    "method": method,
                    "concept": concept,
                    "attribute": attribute,
                    "precision_at_k": p,
                    "results": [r.to_dict() for r in mine],
                }
            )
    return out


def run_demo(
    model: str | Path,
    work: str | Path,
    *,
    live_shards: int,
    num_train: int,
    scope: str,
    num_queries: int,
    prompt: str,
    concepts: list[str],
    methods: list[str],
    top_k: int,
    actors: int,
    address: str,
    report: str | Path | None,
) -> dict:
    """The demo's steps 1-4 (module doc); prints the tables and returns the results
    {"prompt", "scope", "results", "stores", "seconds"}."""
    from ctrak.config import AttributionConfig
    from ctrak.errors import ConfigError
    from ctrak.model import DiffusionModel
    from ctrak.toy.world_shards import generate_world
    from pipeline.bundle import read_bundle, unpack_store
    from pipeline.cluster import ray_session
    from pipeline.config import JobConfig, PipelineConfig, RayConfig
    from pipeline.images import hit_images
    from pipeline.ingest import ingest
    from pipeline.query import QuerySpec, load_query_image, run_queries
    from pipeline.report.render import query_sections, render_report

    start = time.perf_counter()
    work, model_dir = Path(work), Path(model)
    if not (model_dir / "model_index.json").is_file():
        raise ConfigError(f"{model_dir} is not a diffusers model directory (no model_index.json)")
    spec = json.loads((model_dir / "data_spec.json").read_text())
    world, seed = spec["world"], int(spec.get("seed", 0))
    bundles = {m: shipped_bundle(model_dir, m) for m in methods}
    shipped = all(bundles.values())
    total = read_bundle(bundles[methods[0]])["rows"] if shipped else num_train
    if shipped and not 0 <= live_shards < -(-total // SHARD_SIZE):
        raise ConfigError(f"--live-shards {live_shards}: give 0 .. {-(-total // SHARD_SIZE) - 1}")
    dm = DiffusionModel.load(model_dir)
    # 1. the model's training set, or its first num_train images (image i depends on i only)
    data = work / f"data-{world}-{dm.image_size}-{seed}-{total}"
    ids = generate_world(
        world, str(data), num_images=total, image_size=dm.image_size, shard_size=SHARD_SIZE,
        seed=seed,
    )  # fmt: skip
    live = [Path(u).stem for u in sorted(ids)][: live_shards if shipped else None]
    base = AttributionConfig()
    query_config = replace(
        base.query, scope=scope, num_draws=GLOBAL_DRAWS, sample_guidance=GUIDANCE
    )
    specs = [QuerySpec(prompt, concept=c) for c in concepts]
    if scope == "local":
        paths = query_images(dm, world, prompt, num_queries, work)
        specs = [
            QuerySpec(prompt, concept=c, image=load_query_image(str(p)), image_path=str(p))
            for c in concepts
            for p in paths
        ]
    where = (
        f"{total - len(live) * SHARD_SIZE} rows shipped + {len(live)} shard(s) featurized live"
        if shipped
        else f"all {total} rows featurized live"
    )
    print(f"model {model_dir}: {total} training images in {data}; per store {where}")
    # 2.-3. per method: the store (shipped + live), then the queries, through the Ray pipeline
    results, stores = {}, {}
    with ray_session(RayConfig(address=address)):
        for method in methods:
            store = work / f"store-{method}"
            config = PipelineConfig(
                job=JobConfig(
                    data=str(data), store=str(store), model=str(model_dir), batch_size=16,
                    actors=actors, top_k=top_k,
                ),
                attribution=replace(AttributionConfig.for_method(method), query=query_config),
            )  # fmt: skip
            if shipped and not store.exists():
                unpack_store(bundles[method], str(store), drop=live)
            summary = ingest(config, create=not shipped)
            stores[method] = {"store": str(store), **summary.to_dict()}
            if shipped and live:
                stores[method]["live_min_cosine"] = live_agreement(
                    str(store), bundles[method], live
                )
                print(
                    f"{method}: {summary.rows} rows featurized live; against the shipped rows "
                    f"of those keys min cosine {stores[method]['live_min_cosine']:.6f}"
                )
            results[method], _ = run_queries(config, specs, top_k=top_k)
    # 4. tables, Precision@k, report, the next command
    out = print_tables(results, concepts, top_k, scope)
    images = {}
    for method, method_results in results.items():
        images.update(hit_images(stores[method]["store"], method_results, data_uri=str(data)))
    sections = query_sections(results, images)
    if scope == "global":
        mosaic = draws_mosaic(dm, prompt, query_config)
        note = f"global scope: {GLOBAL_DRAWS} draws of the model (9 shown), each inverted"
        sections = [replace(s, image=mosaic, note=note) for s in sections]
    report = Path(report or work / "report.html")
    render_report(
        sections,
        report,
        report.with_suffix(".png"),
        subtitle=f"toy model {dm.fingerprint} · {total} training images ({where}) · "
        f"held-out query {prompt!r}",
    )
    seconds = time.perf_counter() - start
    print(f"\nreport: {report} (grid: {report.with_suffix('.png')})")
    print(f"done in {seconds:.0f}s")
    first = methods[0]
    command = [
        "ctrak", "query", f"job.store={stores[first]['store']}", f"job.model={model_dir}",
        f"attribution.gradient.method={first}", f"attribution.query.num_draws={GLOBAL_DRAWS}",
        f"attribution.query.sample_guidance={GUIDANCE}", "--scope", scope, "--prompt", prompt,
        "--concept", concepts[0], "--report", str(work / "query.html"),
    ]  # fmt: skip
    print("next: query this store yourself, e.g.\n  " + shlex.join(command))
    return {
        "prompt": prompt,
        "scope": scope,
        "results": out,
        "stores": stores,
        "seconds": seconds,
    }
