"""Peak resident memory of featurize and of a query, each in a fresh process, at two sizes.

    python -m pipeline.bench.memory featurize MODEL --params attn2 --samples N --batch-size B
    python -m pipeline.bench.memory query FILE... --k K --queries Q

print one JSON line: {"peak_rss_mb": the peak RSS while featurizing / scanning (VmHWM, reset
after loading: libraries and model included, import-time spikes not), "rss_before_mb", ...}.
(ru_maxrss would not do: Linux carries it over from the parent across exec.) After each batch
or file, free heap memory goes back to the OS (`release_free_memory`). Featurize streams
images in batches and keeps only the k x k Gram; the query streams the store through
`scan.product_scan` (and is timed: the scan of the whole store runs alone in its process;
the seconds spent in the memory probes after each file, and in mapping each file (the GET's
stand-in), are not counted).
Flat = the peak at the larger size over the peak at the smaller one, near 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from ctrak.config import DEFAULT_TOP_K

REPO = Path(__file__).resolve().parents[2]


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Start measuring the peak from now (Linux: write 5 to /proc/self/clear_refs resets
    VmHWM to the current RSS); returns the current RSS, MB."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # no reset: the peak then counts from process start
    return _status_mb("VmRSS") or peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size since the last `reset_peak` (VmHWM), else since start, MB."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
    """Hand glibc's free heap memory back to the OS (malloc_trim), so a later peak counts what
    the code holds, not what the allocator kept from earlier files or batches."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: retained memory counts
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _probe() -> float:
    release_free_memory()
    return round(peak_rss_mb(), 1)


def _result(before: float, **extra: object) -> dict:
    return {**extra, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def run_children(argvs: list[list[str]], threads: int) -> list[dict]:
    """Run this module once per argv, all at once, in fresh interpreters; their JSON lines."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = str(threads)
    base = [sys.executable, "-m", "pipeline.bench.memory"]
    procs = [
        subprocess.Popen(
            [*base, *argv, "--threads", str(threads)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    out = []
    for argv, proc in zip(argvs, procs, strict=True):
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {argv[0]} failed:\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def featurize_child(args: argparse.Namespace) -> dict:
    import torch

    from ctrak.attribution import Attributor
    from ctrak.kernel import gram
    from ctrak.model import DiffusionModel
    from pipeline.bench.models import world_images
    from pipeline.bench.speed import default_config

    model = DiffusionModel.load(args.model)
    attributor = Attributor(model, default_config(tuple(args.params)))
    k = attributor.config.projection.k
    # warm-up on 2 images: builds the projection caches, which then stay resident
    attributor.featurize_batch(*world_images(0, 2, model.image_size)[:2])
    release_free_memory()
    before = reset_peak()
    K, trajectory = torch.zeros(k, k, dtype=torch.float64), []
    for start in range(0, args.samples, args.batch_size):
        n = min(args.batch_size, args.samples - start)
        images, captions, _ = world_images(start, n, model.image_size)
        phi, _ = attributor.featurize_batch(images, captions)
        K += gram(phi)
        del images, phi
        trajectory.append(_probe())
    return _result(before, samples=args.samples, peak_after_each_batch_mb=trajectory)


def query_child(args: argparse.Namespace) -> dict:
    import time

    from pipeline.bench.scan import product_scan, query_vectors

    x = query_vectors(args.k, args.queries)
    product_scan(args.files[:1], x, args.top)  # imports and first touches before the baseline
    if not args.probe:
        return _timed_scans(args, x)
    release_free_memory()
    before = reset_peak()
    trajectory: list[float] = []
    probing = [0.0]  # seconds in the probes: instrumentation, not the scan

    def probe() -> None:
        start = time.perf_counter()
        trajectory.append(_probe())
        probing[0] += time.perf_counter() - start

    begin = time.perf_counter()
    _, rows, loading = product_scan(args.files, x, args.top, probe)
    seconds = time.perf_counter() - begin - probing[0] - loading
    step = max(1, len(trajectory) // 10)
    sampled = trajectory[step - 1 :: step]
    return _result(
        before,
        rows=rows,
        seconds=seconds,
        probe_seconds=probing[0],
        map_seconds=loading,
        peak_after_files_mb=sampled,
    )


def _timed_scans(args: argparse.Namespace, x) -> dict:
    """`args.repeats` rounds of (a memory copy of the store's feature bytes, then the scan),
    alone in this process: the machine's bandwidth drifts over seconds on a shared host, so
    each scan is compared with the copy measured just before it. Returns the median round by
    ratio: {rows, seconds, copy_bytes_per_s, map_seconds, rounds}."""
    import time

    from pipeline.bench.scan import copy_bandwidth, product_scan

    feature_bytes = sum(_rows(f) for f in args.files) * args.k * 2
    rounds = []
    for _ in range(args.repeats):
        copy = copy_bandwidth(feature_bytes)["median"]
        begin = time.perf_counter()
        _, rows, loading = product_scan(args.files, x, args.top)
        seconds = time.perf_counter() - begin - loading
        rounds.append(
            {
                "rows": rows,
                "seconds": seconds,
                "copy_bytes_per_s": copy,
                "map_seconds": loading,
                "ratio": rows * args.k * 2 / seconds / copy,
            }
        )
    median = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
    return {**median, "rounds": rounds}


def _rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def measure_featurize_memory(
    model: str, params: tuple[str, ...], samples: tuple[int, int], batch_size: int, threads: int
) -> dict:
    """Peak RSS of featurize over samples[0] and samples[1] images, in two concurrent fresh
    processes (only memory is read off them)."""
    argvs = []
    for n in samples:
        argv = ["featurize", model, "--samples", str(n), "--batch-size", str(batch_size)]
        argvs.append([*argv, "--params", *params] if params else argv)
    runs = run_children(argvs, threads)
    return {"runs": runs, "peak_ratio": runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]}


def measure_query(files: list[str], split: int, k: int, queries: int, top: int, threads: int):
    """The product scan over files[:split] and over all files, one fresh process at a time
    (the second is the timed scan of the whole store) -> peak RSS of each, and timing."""
    runs = []
    for chosen in (files[:split], files):
        argv = ["query", *chosen, "--k", str(k), "--queries", str(queries), "--top", str(top)]
        runs.extend(run_children([argv], threads))
    return {"runs": runs, "peak_ratio": runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]}


def measure_scan(files: list[str], k: int, queries: int, top: int, threads: int) -> dict:
    """The timed product scan of all files with `queries` query vectors, alone in a fresh
    process and without the memory probes, 3 rounds of a copy then the scan (the median round
    by ratio; the memory-flatness pair is `measure_query`)."""
    argv = ["query", *files, "--k", str(k), "--queries", str(queries), "--top", str(top)]
    argv += ["--no-probe", "--repeats", "3"]
    return run_children([argv], threads)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.memory")
    sub = parser.add_subparsers(dest="what", required=True)
    feat = sub.add_parser("featurize")
    feat.add_argument("model")
    feat.add_argument("--params", nargs="*", default=[])
    feat.add_argument("--samples", type=int, required=True)
    feat.add_argument("--batch-size", type=int, required=True)
    query = sub.add_parser("query")
    query.add_argument("files", nargs="+")
    query.add_argument("--k", type=int, required=True)
    query.add_argument("--queries", type=int, default=8)
    query.add_argument("--top", type=int, default=DEFAULT_TOP_K)
    query.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="time the scan alone: no memory probe (gc + malloc_trim) after each file; "
        "--repeats rounds of a memory copy then the scan",
    )
    query.add_argument("--repeats", type=int, default=3)
    for p in (feat, query):
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from pipeline.quiet import quiet_libraries

    quiet_libraries()
    result = featurize_child(args) if args.what == "featurize" else query_child(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
