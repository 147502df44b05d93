"""`ctrak query`: the training images that taught a concept, from a feature store, on Ray.

One query from flags, or several from a file (TOML `[[queries]]` tables or JSON lines with
prompt / concept / negative / image), all scored in one pass over the store. Prints a table
per query (rank, score, key, shard, caption, metadata); --json writes the same; --report
writes an HTML page (and a PNG) with the query and hit images, relevant hits marked.

    ctrak query --config jobs/configs/dev-local.toml --prompt "a red triangle" \
        --concept triangle --image query.png --top-k 10 --json hits.json
"""

from __future__ import annotations

import argparse

from jobs.config import add_config_arguments, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "query",
        help="top-k training images for a concept, from a feature store (Ray)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--prompt", help='the prompt c, e.g. "a red triangle"')
    parser.add_argument("--concept", help="the target concept in the prompt (default: all)")
    parser.add_argument("--negative", help="c-: the prompt without the concept (derived)")
    parser.add_argument("--image", metavar="PNG", help="query image (local scope)")
    parser.add_argument(
        "--scope",
        choices=["local", "global"],
        help="local: invert --image; global: sample images from the prompt",
    )
    parser.add_argument("--top-k", type=int, help="hits per query (default job.top_k)")
    parser.add_argument("--queries", metavar="FILE", help="several queries (.toml or .jsonl)")
    parser.add_argument(
        "--report", metavar="HTML", help="also write an HTML report with the images (+ .png)"
    )
    parser.add_argument(
        "--index", action="store_true", help="search the store's vector index (`ctrak index`)"
    )
    parser.add_argument("--nprobe", type=int, help="with --index: lists searched (index default)")
    parser.add_argument(
        "--rescore", type=int, help="with --index: candidates rescored exactly (max(10 k, 100))"
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def make_specs(args: argparse.Namespace) -> list:
    from ctrak.errors import ConfigError
    from pipeline.query import QuerySpec, load_query_image

    if args.queries:
        from pipeline.query_text import read_queries_file

        items = read_queries_file(args.queries)
    elif args.prompt is not None:  # an empty prompt is a PromptError, not a missing flag
        items = [
            {
                "prompt": args.prompt,
                "concept": args.concept,
                "negative": args.negative,
                "image": args.image,
            }
        ]
    else:
        raise ConfigError("give --prompt (with --concept, --image) or --queries FILE")
    return [
        QuerySpec(
            prompt=item["prompt"],
            concept=item.get("concept"),
            negative=item.get("negative"),
            image=load_query_image(item["image"]) if item.get("image") else None,
            image_path=item.get("image") or "",
        )
        for item in items
    ]


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster import ray_session
    from pipeline.query import run_queries
    from pipeline.query_text import format_table
    from pipeline.results import write_json

    if args.scope:
        args.overrides = [*args.overrides, f'attribution.query.scope="{args.scope}"']
    config = config_from_args(args)
    specs = make_specs(args)
    with ray_session(config.ray):
        results, info = run_queries(
            config,
            specs,
            top_k=args.top_k,
            index=args.index,
            nprobe=args.nprobe,
            rescore=args.rescore,
        )
    print(format_table(results))
    print(
        f"query: {len(specs)} quer{'y' if len(specs) == 1 else 'ies'} over {info['rows']} "
        f"rows in {info['shards']} shard(s), {info['seconds']:.1f} s -> {info['store']}"
    )
    write_json(args.json, {**info, "results": [r.to_dict() for r in results]})
    if args.report:
        from pipeline.report.render import write_query_report

        write_query_report(args.report, config, results)
    return 0
