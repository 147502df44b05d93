"""`ctrak demo`: a small end-to-end attribution on the shipped toy model, with a top-k table.

Generates the toy model's synthetic training world, featurizes a slice of it, fits the kernel,
generates held-out query images ("a red triangle", a combination the model never saw) and
prints, per method and target concept, the top-10 training images with Precision@10: a
training image is relevant when it has the target attribute.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "ctrak" / "assets"
DEFAULT_MODEL = ASSETS / "toy-paper"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end attribution on the shipped toy model (no server needed)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers model directory")
    parser.add_argument("--work", default="runs/demo", help="folder for data and outputs")
    parser.add_argument("--num-train", type=int, default=96, help="training images attributed")
    parser.add_argument("--num-queries", type=int, default=2, help="query images per prompt")
    parser.add_argument("--prompt", default="a red triangle", help="query prompt")
    parser.add_argument("--concepts", default="triangle,red", help="comma-separated targets")
    parser.add_argument("--methods", default="concept-trak,trak", help="comma-separated methods")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.set_defaults(func=run)


def _training_set(model_dir: Path, work: Path, num_train: int, image_size: int):
    """(images (N, 3, H, W) in [-1, 1], captions, labels) of the model's own training world."""
    from pipeline.synthetic import generate_world, read_samples

    spec_file = model_dir / "data_spec.json"
    spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    num_images = max(int(spec.get("num_images", num_train)), num_train)
    data = work / f"data-{spec.get('world', 'paper')}-{image_size}-{num_images}"
    generate_world(
        spec.get("world", "paper"),
        str(data),
        num_images=num_images,
        image_size=int(spec.get("image_size", image_size)),
        shard_size=int(spec.get("shard_size", 1000)),
        seed=int(spec.get("seed", 0)),
    )
    rows = [row for _, row in zip(range(num_train), read_samples(str(data)), strict=False)]
    images = torch.stack([torch.tensor(r["image"]).permute(2, 0, 1) for r in rows])
    return images.float() / 127.5 - 1, [r["caption"] for r in rows], rows


def run(args: argparse.Namespace) -> int:
    from ctrak.attribution import Attributor, Query
    from ctrak.config import AttributionConfig, GradientConfig
    from ctrak.generation import generate_images
    from ctrak.model import DiffusionModel
    from ctrak.tiny import build_tiny_model

    torch.manual_seed(0)
    start = time.perf_counter()
    work = Path(args.work)
    model_dir = Path(args.model)
    if not (model_dir / "model_index.json").is_file():
        print(f"note: no trained model at {model_dir}; using an UNTRAINED tiny model")
        model_dir = build_tiny_model(work / "tiny-model", image_size=16)
    model = DiffusionModel.load(model_dir)
    images, captions, rows = _training_set(model_dir, work, args.num_train, model.image_size)
    queries_images = generate_images(model, [args.prompt] * args.num_queries, seed=1234)
    print(
        f"model {model_dir} ({model.fingerprint}); {len(rows)} training images; "
        f"{args.num_queries} generated query image(s) of {args.prompt!r}"
    )
    results = []
    for method in args.methods.split(","):
        attributor = Attributor(model, AttributionConfig(gradient=GradientConfig(method=method)))
        t0 = time.perf_counter()
        features = attributor.featurize(images, captions, batch_size=16)
        kernel = attributor.fit(features)
        seconds = time.perf_counter() - t0
        for concept in args.concepts.split(","):
            attribute = concept.strip()
            key = "shape" if any(attribute == r["labels"]["shape"] for r in rows) else "colour"
            queries = [
                Query(args.prompt, concept=attribute, image=queries_images[i : i + 1])
                for i in range(args.num_queries)
            ]
            top = attributor.attribute(queries, features, kernel, top_k=args.top_k)
            precisions = [
                sum(rows[i]["labels"][key] == attribute for i in idx) / len(idx)
                for idx in top.indices.tolist()
            ]
            p10 = sum(precisions) / len(precisions)
            print(
                f"\n{method}  target={attribute!r}  P@{args.top_k}={p10:.2f}  "
                f"(featurize {seconds / len(rows):.2f} s/sample)"
            )
            print(f"  {'rank':>4}  {'key':>9}  {'score':>10}  caption")
            hits = []
            for rank, (i, s) in enumerate(
                zip(top.indices[0].tolist(), top.values[0].tolist(), strict=True), 1
            ):
                mark = "*" if rows[i]["labels"][key] == attribute else " "
                print(f"  {rank:>4}  {rows[i]['key']:>9}  {s:>10.4g}  {mark} {captions[i]}")
                hits.append(
                    {
                        "rank": rank,
                        "key": rows[i]["key"],
                        "score": s,
                        "caption": captions[i],
                        "relevant": mark == "*",
                    }
                )
            results.append(
                {
                    "method": method,
                    "concept": attribute,
                    "precision_at_k": p10,
                    "top": hits,
                    "featurize_s_per_sample": seconds / len(rows),
                }
            )
    total = time.perf_counter() - start
    print(f"\n(* = has the target attribute)  done in {total:.0f}s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"prompt": args.prompt, "results": results, "seconds": total}, indent=2)
            + "\n"
        )
    return 0
