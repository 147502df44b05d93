"""`ctrak reindex`: bring an existing feature store up to date with its data URI, on Ray.

Featurizes only the shards of job.data that the store has no done-marker for, adds their
partial Grams to the stored Fisher and refactorises it. Refuses a store made with another
model, method or projection (ProvenanceMismatchError, naming what differs). Meant to run on a
schedule (infra/kuberay/reindex-cronjob.yaml); a run with nothing new does no work.

    ctrak reindex --config jobs/configs/laion-sd15.toml
"""

from __future__ import annotations

import argparse

from jobs.config import add_config_arguments, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reindex",
        help="featurize the shards a feature store lacks and refresh its Fisher (Ray)",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.results import run_ingest

    return run_ingest(config_from_args(args), create=False, verb="reindex", json_path=args.json)
