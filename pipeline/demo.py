"""The demo (`ctrak demo`): the production pipeline end to end on the shipped toy model, no
server needed.

1. writes a prefix of the toy model's own synthetic training set as WebDataset shards in a
   local folder (the embedded default "object store");
2. generates held-out query images ("a red triangle": a combination the model never saw),
   keeping those a classifier confirms show it;
3. per method, `featurize` through Ray Data (decode tasks -> featurize actors -> Parquet
   feature shards + partial Grams -> Fisher) on a local Ray cluster, then `query` (solve once,
   scatter over the shards, gather the top-k) for each target concept;
4. prints the top-10 per method and concept with Precision@10 (relevant = the training image
   has the target attribute) and writes report.html (+ report.png).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


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
            generate_images(model, [prompt] * max(n, 4), seed=1234 + attempt, guidance=1.0)
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


def _precision(hits, attribute: str, value: str) -> float:
    return float(np.mean([(h.metadata or {}).get(attribute) == value for h in hits]))


def run_demo(
    model: str | Path,
    work: str | Path,
    *,
    num_train: int,
    shard_size: int,
    num_queries: int,
    prompt: str,
    concepts: list[str],
    methods: list[str],
    top_k: int,
    actors: int,
    address: str,
    report: str | Path | None,
) -> dict:
    """The demo's steps 1-5 (module doc); prints the tables and returns the results
    {"prompt", "results", "featurize", "seconds"}."""
    from ctrak.config import AttributionConfig, GradientConfig
    from ctrak.model import DiffusionModel
    from ctrak.toy.tiny import build_tiny_model
    from ctrak.toy.world_shards import generate_world
    from pipeline.cluster import ray_session
    from pipeline.config import JobConfig, PipelineConfig, RayConfig
    from pipeline.ingest import ingest
    from pipeline.query import QuerySpec, load_query_image, run_queries

    start = time.perf_counter()
    work = Path(work)
    model_dir = Path(model)
    if not (model_dir / "model_index.json").is_file():
        print(f"note: no trained model at {model_dir}; using an UNTRAINED tiny model")
        model_dir = build_tiny_model(work / "tiny-model", image_size=16)
    spec_file = model_dir / "data_spec.json"
    spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    world, seed = spec.get("world", "paper"), int(spec.get("seed", 0))
    model = DiffusionModel.load(model_dir)
    # 1. the first num_train images of the model's training set (image i depends on i only)
    data = work / f"data-{world}-{model.image_size}-{seed}-{num_train}"
    generate_world(
        world,
        str(data),
        num_images=num_train,
        image_size=model.image_size,
        shard_size=shard_size,
        seed=seed,
    )
    # 2. query images the model drew for the prompt
    paths = query_images(model, world, prompt, num_queries, work)
    specs = [
        QuerySpec(prompt, concept=c, image=load_query_image(str(p)), image_path=str(p))
        for c in concepts
        for p in paths
    ]
    print(
        f"model {model_dir} ({model.fingerprint}), {num_train} training images in "
        f"{data}, {len(paths)} query image(s) of {prompt!r}"
    )
    # 3. featurize and query through the Ray pipeline, one store per method
    results, timings = {}, {}
    with ray_session(RayConfig(address=address)):
        for method in methods:
            config = PipelineConfig(
                job=JobConfig(
                    data=str(data),
                    store=str(work / f"store-{method}-{model.fingerprint}"),
                    model=str(model_dir),
                    batch_size=16,
                    actors=actors,
                    top_k=top_k,
                ),
                attribution=AttributionConfig(gradient=GradientConfig(method=method)),
            )
            summary = ingest(config, create=True)
            results[method], _ = run_queries(config, specs, top_k=top_k)
            timings[method] = summary.to_dict()
    # 4. tables, Precision@k, report
    out = []
    for method, method_results in results.items():
        for concept in concepts:
            attribute = (
                "shape"
                if any(
                    (h.metadata or {}).get("shape") == concept
                    for r in method_results
                    for h in r.hits
                )
                else "colour"
            )
            mine = [r for r in method_results if r.query.concept == concept]
            p = float(np.mean([_precision(r.hits, attribute, concept) for r in mine]))
            print(
                f"\n{method}  target={concept!r}  P@{top_k}={p:.2f}"
                f"  (averaged over {len(mine)} query image(s); * = has the target)"
            )
            for h in mine[0].hits:
                mark = "*" if (h.metadata or {}).get(attribute) == concept else " "
                print(f"  {h.rank:>3}  {h.score:>10.4g}  {h.key}  {mark} {h.caption}")
            out.append(
                {
                    "method": method,
                    "concept": concept,
                    "precision_at_k": p,
                    "results": [r.to_dict() for r in mine],
                }
            )
    # 5. the report: query image, per method the top-k images with scores, relevant marked
    from pipeline.images import hit_images
    from pipeline.report.render import query_sections, render_report

    images = {}
    for method, method_results in results.items():
        store = str(work / f"store-{method}-{model.fingerprint}")
        images.update(hit_images(store, method_results, data_uri=str(data)))
    report = Path(report or work / "report.html")
    render_report(
        query_sections(results, images),
        report,
        report.with_suffix(".png"),
        subtitle=f"toy model {model.fingerprint} · {num_train} training images · "
        f"held-out query {prompt!r}",
    )
    seconds = time.perf_counter() - start
    print(f"\nreport: {report} (grid: {report.with_suffix('.png')})")
    print(f"done in {seconds:.0f}s")
    return {"prompt": prompt, "results": out, "featurize": timings, "seconds": seconds}
