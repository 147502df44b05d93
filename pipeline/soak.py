"""Soak: many rounds of reindex under random faults, with queries running beside them; after
every round the store must equal a clean one (issue 23, item 6).

    python -m pipeline.soak --root runs/soak --shards 1000 --rounds 20 --out docs/soak-1000

Set-up: `shards` small shards (tiny model, `rows` rows each) on local disk; a SeaweedFS
server holds the store; a clean reference store is featurized once, fault-free, and the store
under test starts as its copy. Each round deletes `redo` random shards from the store (marker
and files: as if they were new), then reindexes with one random fault:

- actor-exit: a featurize actor exits hard mid-batch (once);
- s3-restart: the S3 server is stopped at the first shard write and restarted 2 s later;
- driver-kill: the reindex driver (a subprocess) SIGKILLs itself after its first shard, then
  a rerun completes it.

A query thread runs queries against the store throughout; each must answer or refuse with a
named error (StaleFisherError while shards are missing) - any other outcome fails the soak.
After the round: rows lost / duplicated against the reference (must be 0) and the Fisher
within the fault tests' tolerance. Also measured: listing the shards and a full Fisher merge
at this store size (seconds, peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np

FAULTS = ("actor-exit", "s3-restart", "driver-kill")


def digest(store) -> dict:
    """{key: feature (k,)} of every stored row, the rows' count and the Fisher's K."""
    from pipeline.feature_file import table_features
    from pipeline.fisher import current_kernel

    features, rows = {}, 0
    for _, entry in sorted(store.entries().items()):
        table = store.read_features(entry)
        for key, phi in zip(table.column("key").to_pylist(), table_features(table), strict=True):
            features[f"{entry.shard}/{key}"] = phi
            rows += 1
    kernel, _ = current_kernel(store, 1.0)
    return {"features": features, "rows": rows, "K": kernel.K.numpy()}


def compare(got: dict, want: dict) -> dict:
    """Rows lost / duplicated and the worst feature and Fisher differences."""
    lost = len(set(want["features"]) - set(got["features"]))
    dup = got["rows"] - len(got["features"])
    common = sorted(set(want["features"]) & set(got["features"]))
    worst = max((np.abs(got["features"][k] - want["features"][k]).max() for k in common), default=0)
    fisher = float(np.abs(got["K"] - want["K"]).max() / max(np.abs(want["K"]).max(), 1e-30))
    equal = lost == 0 and dup == 0 and worst <= 1e-4 and fisher <= 1e-4
    return {
        "lost": lost,
        "duplicated": dup,
        "max_feature_diff": float(worst),
        "fisher_rel_diff": fisher,
        "equal": bool(equal),
    }


def _drop(store, shards: list[str]) -> None:
    for shard in shards:
        entry = store.entries([shard])[shard]
        store.fs.rm_file(store.path("done", f"{shard}.json"))
        for info in entry.files.values():
            store.fs.rm_file(store.path(info["path"]))


def measure(store, data: str, storage) -> dict:
    """Seconds and peak Python memory of listing the data's shards, reading every marker,
    and a full Fisher merge (fisher.json removed first)."""
    from pipeline.fisher import update_fisher
    from pipeline.shards import list_shards

    out = {}
    for name, fn in (
        ("list_shards", lambda: list_shards(data, storage)),
        ("read_markers", lambda: store.entries()),
        (
            "fisher_full_merge",
            lambda: (
                store.fs.rm_file(store.path("fisher", "fisher.json")),
                update_fisher(store, 1.0),
            ),
        ),
    ):
        tracemalloc.start()
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out[name] = {"seconds": round(seconds, 3), "peak_mb": round(peak / 1e6, 1)}
    return out


def _query_loop(config, spec, stop: threading.Event, tally: dict) -> None:
    from ctrak.errors import CtrakError
    from pipeline.query import run_queries

    while not stop.is_set():
        try:
            run_queries(config, [spec], top_k=3)
            tally["answered"] += 1
        except CtrakError as err:  # a named refusal (StaleFisherError mid-round)
            tally["refused:" + type(err).__name__] = (
                tally.get("refused:" + type(err).__name__, 0) + 1
            )
        except Exception as err:  # anything else fails the soak
            tally.setdefault("errors", []).append(f"{type(err).__name__}: {err}"[:300])
        stop.wait(0.5)


def run_soak(
    root: str,
    model: str,
    *,
    shards: int,
    rows: int,
    rounds: int,
    redo: int,
    seed: int = 0,
    faults: tuple[str, ...] = FAULTS,
    cycle: bool = False,
    log=print,
) -> dict:
    """Run the soak (module doc); returns {"rounds": [...], "measure": {...}, "ok": bool}.
    `cycle`: the faults in turn (the CI run) instead of at random. Joins the Ray this
    process already has (a test session's), else starts a local one of 2 CPUs."""
    import ray

    from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig
    from ctrak.toy.world_shards import generate_world
    from pipeline.cluster import ray_session
    from pipeline.config import JobConfig, PipelineConfig, RayConfig, StorageConfig
    from pipeline.dev.s3server import start
    from pipeline.ingest import ingest
    from pipeline.query import QuerySpec
    from pipeline.store import FeatureStore

    rng = random.Random(seed)
    root_path = Path(root)
    shutil.rmtree(root_path, ignore_errors=True)
    data = root_path / "data"
    generate_world(
        "paper", str(data), num_images=shards * rows, image_size=16, shard_size=rows, seed=seed
    )
    port = _free_port(19700 + seed % 50 * 20)
    server = start(
        root_path / "s3", s3_port=port, bucket="soak", key="soak-key-1", secret="soak-secret-1"
    )
    storage = StorageConfig(
        endpoint_url=server.endpoint_url, region="us-east-1", key=server.key, secret=server.secret
    )
    attribution = AttributionConfig(
        gradient=GradientConfig(timesteps=(499, 899)), projection=ProjectionConfig(k=32)
    )
    job = JobConfig(
        data=str(data),
        store=str(root_path / "reference"),
        model=model,
        batch_size=4,
        feature_dtype="float32",
        max_reject_fraction=1.0,
        lease_ttl_s=30,
    )
    reference = PipelineConfig(job=job, ray=RayConfig(progress=False), attribution=attribution)
    uri = "s3://soak/store"
    config = replace(reference, job=replace(job, store=uri), storage=storage)
    report: dict = {"shards": shards, "rows_per_shard": rows, "rounds": []}
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        with ray_session(reference.ray):
            t0 = time.perf_counter()
            ingest(reference, create=True, progress=False)
            report["reference_seconds"] = round(time.perf_counter() - t0, 1)
            want = digest(FeatureStore(job.store))
            store = FeatureStore(uri, storage)
            store.fs.put(
                str(root_path / "reference") + "/", uri.removeprefix("s3://"), recursive=True
            )
            image = np.full((16, 16, 3), 120, np.uint8)
            spec = QuerySpec("a red circle", concept="red", image=image)
            for number in range(1, rounds + 1):
                kind = faults[(number - 1) % len(faults)] if cycle else rng.choice(faults)
                dropped = rng.sample(sorted(store.done_ids()), redo)
                _drop(store, dropped)
                tally: dict = {"answered": 0}
                stop = threading.Event()
                queries = threading.Thread(target=_query_loop, args=(config, spec, stop, tally))
                queries.start()
                t0 = time.perf_counter()
                _round(kind, config, store, server, storage, root_path, number, rng)
                seconds = time.perf_counter() - t0
                stop.set()
                queries.join()
                result = {
                    "round": number,
                    "fault": kind,
                    "shards_redone": redo,
                    "seconds": round(seconds, 1),
                    "queries": tally,
                    **compare(digest(store), want),
                }
                result["equal"] = result["equal"] and not tally.get("errors")
                report["rounds"].append(result)
                log(json.dumps(result))
            report["measure"] = measure(store, str(data), storage)
            log(json.dumps(report["measure"]))
    finally:
        if own_ray:
            ray.shutdown()
        server.stop()
    report["ok"] = all(r["equal"] for r in report["rounds"])
    return report


def _round(kind, config, store, server, storage, root: Path, number: int, rng) -> None:
    from pipeline.ingest import ingest
    from pipeline.store import FeatureStore

    if kind == "actor-exit":
        pending = sorted(
            set(
                s.removesuffix(".tar").rsplit("/", 1)[-1]
                for s in os.listdir(config.job.data)
                if s.endswith(".tar")
            )
            - set(store.done_ids())
        )
        marker = root / f"actor-exit-{number}"
        os.environ["CTRAK_FAULT"] = f"actor-exit:shard={rng.choice(pending)}:row=0:once={marker}"
        try:
            ingest(config, create=False, progress=False)
        finally:
            os.environ.pop("CTRAK_FAULT", None)
    elif kind == "s3-restart":
        original, state = FeatureStore.write_shard, {}

        def write_shard(self, *args, **kwargs):
            if not state:
                state["stopped"] = True
                server.stop()
                threading.Timer(2.0, lambda: state.update(back=_restart(server, root))).start()
            return original(self, *args, **kwargs)

        FeatureStore.write_shard = write_shard
        try:
            ingest(config, create=False, progress=False)
        finally:
            FeatureStore.write_shard = original
        while "back" not in state:
            time.sleep(0.1)
    else:  # driver-kill: a subprocess reindex killed after its first shard, then a rerun
        import ray

        address = ray.get_runtime_context().gcs_address
        s = config.storage
        env = {
            **os.environ,
            "CTRAK_FAULT": "driver-kill:after=1",
            "AWS_ACCESS_KEY_ID": s.key,
            "AWS_SECRET_ACCESS_KEY": s.secret,
            "AWS_ENDPOINT_URL_S3": s.endpoint_url,
            "AWS_REGION": "us-east-1",
        }
        args = [
            f"job.data={config.job.data}",
            f"job.store={config.job.store}",
            f"job.model={config.job.model}",
            "attribution.projection.k=32",
            "attribution.gradient.timesteps=[499, 899]",
            "job.batch_size=4",
            'job.feature_dtype="float32"',
            "job.max_reject_fraction=1.0",
            "--no-progress",
        ]
        subprocess.run(
            [sys.executable, "-m", "jobs.cli", "reindex", "--address", address, *args],
            env=env,
            capture_output=True,
            timeout=900,
        )
        ingest(config, create=False, progress=False)


def _free_port(first: int) -> int:
    """The first S3 base port from `first` (steps of 20) whose derived ports are all free."""
    from pipeline.dev.s3server import _port_open, ports

    for base in range(first, first + 2000, 20):
        if not any(p and _port_open(p) for p in ports(base).values()):
            return base
    raise RuntimeError(f"no free port range for the soak's S3 server from {first}")


def _restart(server, root: Path):
    from pipeline.dev.s3server import start

    port = int(server.endpoint_url.rsplit(":", 1)[1])
    back = start(
        root / "s3", s3_port=port, bucket=server.bucket, key=server.key, secret=server.secret
    )
    object.__setattr__(server, "process", back.process)  # the same server, running again
    return back


def write_table(report: dict, out: str) -> None:
    """<out>.json (the whole report) and <out>.md (the table)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    kinds: dict[str, int] = {}
    for r in report["rounds"]:
        kinds[r["fault"]] = kinds.get(r["fault"], 0) + 1
    lines = [
        f"# Soak: {report['shards']} shards x {report['rows_per_shard']} rows, "
        f"{len(report['rounds'])} rounds",
        "",
        f"faults by kind: {kinds}; reference featurize {report.get('reference_seconds')} s; "
        f"all rounds equal to the clean store: {report['ok']}",
        "",
        "| round | fault | shards redone | s | rows lost | duplicated | max feature diff | "
        "Fisher rel diff | queries |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        lines.append(
            f"| {r['round']} | {r['fault']} | {r['shards_redone']} | {r['seconds']} | "
            f"{r['lost']} | {r['duplicated']} | {r['max_feature_diff']:.2e} | "
            f"{r['fisher_rel_diff']:.2e} | {r['queries']} |"
        )
    if "measure" in report:
        lines += ["", f"measured at {report['shards']} shards: {report['measure']}"]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.soak", description=__doc__)
    parser.add_argument("--root", default="runs/soak")
    parser.add_argument("--model", default="", help="a model directory (default: a tiny one)")
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--redo", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/soak-1000")
    args = parser.parse_args(argv)
    model = args.model
    if not model:
        from ctrak.toy.tiny import build_tiny_model

        model = str(build_tiny_model(Path(args.root + "-model"), latent=False, seed=0))
    report = run_soak(
        args.root,
        model,
        shards=args.shards,
        rows=args.rows,
        rounds=args.rounds,
        redo=args.redo,
        seed=args.seed,
        log=lambda s: print(s, flush=True),
    )
    write_table(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
