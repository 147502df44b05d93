"""The config arguments every Ray job takes: --config FILE, KEY=VALUE overrides (anywhere on
the line), --address, --no-progress, --json; read by `pipeline.config_file.load_config`."""

from __future__ import annotations

import argparse

from pipeline.config import PipelineConfig


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser whose KEY=VALUE positionals may sit between options
    (`--config f a=1 --json out b=2`); plain argparse stops at the first option."""

    def parse_known_args(self, args=None, namespace=None):
        if getattr(self, "_intermixing", False):
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config FILE, KEY=VALUE overrides (anywhere), --address, --no-progress, --json."""
    parser.__class__ = _IntermixedParser
    parser.add_argument("--config", metavar="FILE", help="TOML config (see jobs/configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. job.store=s3://bucket/store attribution.projection.k=1024",
    )
    parser.add_argument(
        "--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local cluster)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """The config file + overrides, with --address / --no-progress applied last."""
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f'ray.address="{args.address}"')
    if args.no_progress:
        overrides.append("ray.progress=false")
    from pipeline.config_file import load_config

    return load_config(args.config, overrides)
