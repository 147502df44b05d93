"""`ctrak featurize`: featurize every shard of a data URI into a feature store, on Ray.

Creates the store (or resumes one: shards with a done-marker are skipped), streams the rest
through decode (CPU tasks) and the Concept-TRAK actors (one GPU each when the cluster has
GPUs), writes one Parquet feature shard + partial Gram per input shard, then merges the Fisher.

    ctrak featurize --config jobs/configs/dev-local.toml job.data=runs/data job.store=runs/store
"""

from __future__ import annotations

import argparse
import json
import logging

from jobs.config import add_config_arguments, config_from_args

log = logging.getLogger("ctrak.featurize")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "featurize",
        help="featurize WebDataset shards into a feature store (Ray)",
        description=__doc__.split("\n\n")[0],
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def print_summary(summary, verb: str) -> None:
    """The closing summary of a featurize/reindex run."""
    s = summary
    print(
        f"{verb}: {s.written} shard(s) written, {s.skipped} already in the store, "
        f"{len(s.failed)} failed; {s.rows} rows, {s.rejected} rejected; "
        f"{s.fisher_grams_added} Gram(s) added to the Fisher; {s.seconds:.1f} s "
        f"({s.samples_per_s:.2f} samples/s featurizing) -> {s.store}"
    )


def write_json(path: str | None, body: dict) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(body, handle, indent=2, sort_keys=True)
            handle.write("\n")


def run_ingest(args: argparse.Namespace, *, create: bool, verb: str) -> int:
    from pipeline.cluster import ray_session
    from pipeline.ingest import ingest

    config = config_from_args(args)
    with ray_session(config.ray):
        summary = ingest(config, create=create, progress=config.ray.progress)
    print_summary(summary, verb)
    write_json(args.json, summary.to_dict())
    return 0


def run(args: argparse.Namespace) -> int:
    return run_ingest(args, create=True, verb="featurize")
