"""`ctrak featurize`: featurize every shard of a data URI into a feature store, on Ray.

Creates the store (or resumes one: shards with a done-marker are skipped), streams the rest
through decode (CPU tasks) and the Concept-TRAK actors (one GPU each when the cluster has
GPUs), writes one Parquet feature shard + partial Gram per input shard, then merges the Fisher.

    ctrak featurize --config jobs/configs/dev-local.toml job.data=runs/data job.store=runs/store
"""

from __future__ import annotations

import argparse

from jobs.config import add_config_arguments, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "featurize",
        help="featurize WebDataset shards into a feature store (Ray)",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.results import run_ingest

    return run_ingest(config_from_args(args), create=True, verb="featurize", json_path=args.json)
