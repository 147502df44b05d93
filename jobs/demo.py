"""`ctrak demo`: the production pipeline end to end on the shipped toy model, no server needed.

The steps are `pipeline.demo.run_demo`'s (its module doc): shards of the toy model's own
training set; per method the shipped feature store with a few shards featurized live
(reindex: featurize -> Fisher) on a local Ray cluster; the held-out query "a red triangle"
per target concept; the top-10 tables with Precision@10 and report.html (+ report.png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctrak.config import DEFAULT_TOP_K
from ctrak.toy import DEFAULT_MODEL


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end attribution on the shipped toy model through the Ray pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers model directory")
    parser.add_argument("--work", default="runs/demo", help="folder for data, stores, report")
    parser.add_argument(
        "--live-shards", type=int, default=2, help="shards of 40 images featurized live"
    )
    parser.add_argument(
        "--num-train",
        type=int,
        default=160,
        help="training images featurized live for a model without shipped stores",
    )
    parser.add_argument(
        "--scope",
        choices=("global", "local"),
        default="global",
        help="global: the model's own draws of the prompt; local: generated query images",
    )
    parser.add_argument("--num-queries", type=int, default=2, help="query images (local scope)")
    parser.add_argument("--prompt", default="a red triangle", help="query prompt")
    parser.add_argument("--concepts", default="triangle,red", help="comma-separated targets")
    parser.add_argument("--methods", default="concept-trak,trak", help="comma-separated methods")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    parser.add_argument("--actors", type=int, default=1, help="featurize actors")
    parser.add_argument("--address", default="", help="Ray cluster to join (default: local)")
    parser.add_argument("--report", default=None, help="report path (default WORK/report.html)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    result = run_demo(
        args.model,
        args.work,
        live_shards=args.live_shards,
        num_train=args.num_train,
        scope=args.scope,
        num_queries=args.num_queries,
        prompt=args.prompt,
        concepts=[c.strip() for c in args.concepts.split(",") if c.strip()],
        methods=args.methods.split(","),
        top_k=args.top_k,
        actors=args.actors,
        address=args.address,
        report=args.report,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
