"""`ctrak reindex`: bring an existing feature store up to date with its data URI, on Ray.

Featurizes only the shards of job.data that the store has no done-marker for, adds their
partial Grams to the stored Fisher and refactorises it. Refuses a store made with another
model, method or projection (ProvenanceMismatchError, naming what differs). A store with a
vector index (`ctrak index`) gets the new feature shards added to it as new index shards.
Meant to run on a schedule (infra/kuberay/reindex-cronjob.yaml); a run with nothing new does
no work.

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
    from pipeline.cluster import ray_session
    from pipeline.index import index_info, update_index
    from pipeline.results import run_ingest
    from pipeline.store import FeatureStore

    config = config_from_args(args)
    code = run_ingest(config, create=False, verb="reindex", json_path=args.json)
    store = FeatureStore(config.job.store, config.storage.resolved())
    if code == 0 and index_info(store) is not None:  # new feature shards -> new index shards
        with ray_session(config.ray):
            info = update_index(store)
        print(
            f"index: {info['added_shards']} feature shard(s) added; {info['rows']} rows in "
            f"{len(info['groups'])} index shard(s)"
        )
    return code
