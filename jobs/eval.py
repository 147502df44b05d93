"""`ctrak eval`: Precision@10 of every method on a synthetic world or a labelled set
(`--data SHARDS --labels KEY,KEY`), in the paper's layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctrak.toy import DEFAULT_MODEL


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Precision@10 of each method on the model's synthetic world",
        description="For each method and query (every combination of the world, in-"
        "distribution and held out, each attribute as the target; local scope on generated "
        "query images and global scope), Precision@10 against the JSON labels.",
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model with data_spec.json")
    parser.add_argument("--methods", default="concept-trak,trak,d-trak,das")
    parser.add_argument(
        "--variants",
        choices=["methods", "ablation", "cost", "reference"],
        default="methods",
        help="methods: --methods with defaults; ablation: the paper's component ablation; "
        "cost: inversion steps / guidance / number of timesteps; reference: the default path "
        "vs the benchmark's naive reference",
    )
    parser.add_argument(
        "--num-train",
        type=int,
        default=None,
        help="attribute the first N training rows (default: the model's whole training set, "
        "as the paper does; fewer rows leave fewer relevant candidates and a noisier kernel)",
    )
    parser.add_argument("--per-combo", type=int, default=4, help="query images per combination")
    parser.add_argument("--scopes", default="local,global")
    parser.add_argument(
        "--global-draws",
        type=int,
        default=32,
        help="model draws averaged per global-scope query (a Monte Carlo mean; the paper used "
        "256; 8 vs 32 on toy-paper: docs/experiments.md)",
    )
    for flag, default, meaning in (
        ("--global-queries", 1, "independent global-scope queries per combination and target"),
        ("--global-seed", 0, "seed of global query 1's draws, query j: + j (README tables: 0)"),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"{meaning} (default {default})")
    parser.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="CFG weight for query images and global draws (toy-paper composes at 1)",
    )
    parser.add_argument(
        "--query-seed",
        type=int,
        default=1000,
        help="seed of the local query images (the README's tables: 1000; settings were chosen "
        "on 5000)",
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override every variant's attribution setting (repeatable; keys under "
        "attribution., values TOML literals), e.g. --set projection.k_side=8",
    )
    parser.add_argument(
        "--index",
        action="store_true",
        help="also rank through a vector index of the features (rows '<method> + index', "
        "recall@10 vs the exact top-10 in the JSON)",
    )
    parser.add_argument("--index-codes", default="sq4", help="with --index: index codes (sq4)")
    parser.add_argument("--data", help="labelled shards the model was trained on (+ --labels)")
    parser.add_argument("--labels", help="the .json keys that are the attributes: shape,colour")
    parser.add_argument(
        "--caption-template",
        help="with --labels: the query prompt of a combination, e.g. 'a {colour} {shape}' "
        "(default: read from the captions by substituting the label values)",
    )
    parser.add_argument(
        "--min-concept-rate",
        type=float,
        default=0.8,
        help="refuse a target the model draws right less often on trained combinations "
        "(MODEL/concept_check.json; 0: no check)",
    )
    parser.add_argument(
        "--check-per-combo",
        type=int,
        default=16,
        help="draws per combination when the concept check is drawn here",
    )
    parser.add_argument("--work", default="runs/eval", help="data and feature cache folder")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    parser.add_argument("--json", metavar="PATH", help="write every record as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.evaluation.synthetic_bench import evaluate, markdown_table
    from pipeline.evaluation.variants import chosen_variants
    from pipeline.index import IndexSpec

    variants = chosen_variants(args.variants, args.methods.split(","), args.set)
    result = evaluate(
        args.model,
        variants,
        work=args.work,
        num_train=args.num_train,
        per_combo=args.per_combo,
        scopes=args.scopes.split(","),
        global_draws=args.global_draws,
        guidance=args.guidance,
        query_seed=args.query_seed,
        global_seed=args.global_seed,
        global_queries=args.global_queries,
        index=IndexSpec(codes=args.index_codes) if args.index else None,
        data=args.data,
        labels=args.labels,
        caption_template=args.caption_template,
        min_concept_rate=args.min_concept_rate,
        check_per_combo=args.check_per_combo,
    )
    table = markdown_table(result)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
