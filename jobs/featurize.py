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
import os

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
    """The closing summary of a featurize/reindex run, with the reject count and reasons."""
    s = summary
    print(
        f"{verb}: {s.written} shard(s) written, {s.skipped} already in the store; "
        f"{s.rows} rows featurized, {s.rejected} rejected; "
        f"{s.fisher_grams_added} Gram(s) added to the Fisher; {s.seconds:.1f} s "
        f"({s.samples_per_s:.2f} samples/s featurizing) -> {s.store}"
    )
    if s.rejected:
        top = sorted(s.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        print(f"rejected rows by reason (all of them in {s.store}/rejects/<shard>.parquet):")
        for reason, count in top:
            print(f"  {count:>6}  {reason[:100]}")
    print(f"store: {s.store_rows} rows, {s.store_rejected} rejected")


def write_json(path: str | None, body: dict) -> None:
    """Write `body` as JSON at `path` (when given), atomically: a reader (or a crash) never
    leaves half a file."""
    if not path:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as handle:
            json.dump(body, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_ingest(args: argparse.Namespace, *, create: bool, verb: str) -> int:
    from pipeline.cluster import ray_session
    from pipeline.errors import RejectBudgetError
    from pipeline.ingest import ingest

    config = config_from_args(args)
    with ray_session(config.ray):
        try:
            summary = ingest(config, create=create, progress=config.ray.progress)
        except RejectBudgetError as err:  # every shard is written: still report the run
            print_summary(err.summary, verb)
            write_json(args.json, err.summary.to_dict())
            raise
    print_summary(summary, verb)
    write_json(args.json, summary.to_dict())
    return 0


def run(args: argparse.Namespace) -> int:
    return run_ingest(args, create=True, verb="featurize")
