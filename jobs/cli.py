"""The `ctrak` command. Each job module registers one subcommand.

A job module exposes `register(subparsers) -> None`, which adds its parser and sets
`func=run` where `run(args) -> int` is the exit code. Jobs report results as JSON with
`--json PATH` where they report anything.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Subcommand modules, in the order `ctrak --help` lists them. A module that is absent in this
# checkout (work in progress) is skipped rather than breaking the command.
JOB_MODULES = (
    "jobs.featurize",
    "jobs.reindex",
    "jobs.query",
    "jobs.index",
    "jobs.generate",
    "jobs.train_toy",
    "jobs.eval",
    "jobs.check_concepts",
    "jobs.counterfactual",
    "jobs.bench",
    "jobs.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrak",
        description="Concept-level training-data attribution for diffusion models (Concept-TRAK).",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="let every library message through (Ray, Ray Data progress, diffusers)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in JOB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help exits here, before any heavy import
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ctrak.errors import CtrakError
    from pipeline.quiet import quiet_libraries

    if args.verbose:
        os.environ["CTRAK_VERBOSE"] = "1"  # read by pipeline.cluster (Ray's own messages)
    else:
        quiet_libraries()

    try:
        return int(args.func(args) or 0)
    except CtrakError as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
