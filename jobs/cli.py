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
    "jobs.generate",
    "jobs.train_toy",
    "jobs.eval",
    "jobs.bench",
    "jobs.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrak",
        description="Concept-level training-data attribution for diffusion models (Concept-TRAK).",
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


def quiet_libraries() -> None:
    """Keep third-party chatter (weight loading bars, hub hints) out of job output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    args = build_parser().parse_args(argv)
    from ctrak.errors import CtrakError

    try:
        return int(args.func(args) or 0)
    except CtrakError as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
