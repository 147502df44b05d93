"""`ctrak index`: build the feature store's vector index (FAISS IVF over the raw phi_i), on Ray.

Trains on a sample of the store's features, encodes one index shard per group of feature
shards (a Ray task each), and writes index/ into the store with its provenance and marker
(`pipeline.index`). `ctrak query --index` searches it; `ctrak reindex` adds new feature
shards to it. Rerun after a feature file was replaced (a query says so).

    ctrak index --config jobs/configs/dev-local.toml job.store=runs/store --codes sq4
"""

from __future__ import annotations

import argparse

from jobs.config import add_config_arguments, config_from_args
from pipeline.results import write_json

CODES = (
    "sq4",
    "sq8",
    "sq16",
    "pq",
    "flat",
)  # pipeline.index.CODES (not imported: --help stays light)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build the store's vector index for fast queries (FAISS, Ray)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--codes", choices=CODES, default="sq4", help="row codes (default sq4)")
    parser.add_argument("--nlist", type=int, help="inverted lists (default: ~sqrt(rows)/2)")
    parser.add_argument("--nprobe", type=int, help="default lists searched per query (nlist: all)")
    parser.add_argument(
        "--group-shards", type=int, default=16, help="feature shards per index shard (16)"
    )
    parser.add_argument("--train-rows", type=int, default=65536, help="training sample rows")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from pipeline.cluster import ray_session
    from pipeline.index import IndexSpec, build_index
    from pipeline.store import FeatureStore

    config = config_from_args(args)
    config.job.require("store")
    spec = IndexSpec(
        codes=args.codes,
        nlist=args.nlist,
        nprobe=args.nprobe,
        group_shards=args.group_shards,
        train_rows=args.train_rows,
    )
    spec.check()
    begin = time.perf_counter()
    with ray_session(config.ray):
        info = build_index(FeatureStore(config.job.store, config.storage.resolved()), spec)
    seconds = time.perf_counter() - begin
    size = sum(g["bytes"] for g in info["groups"])
    print(
        f"index: {info['factory']} over {info['rows']} rows in {len(info['groups'])} index "
        f"shard(s), {size / max(info['rows'], 1):.1f} bytes/row, nprobe {info['nprobe']}; "
        f"{seconds:.1f} s -> {config.job.store}/index"
    )
    write_json(args.json, {**info, "seconds": seconds})
    return 0
