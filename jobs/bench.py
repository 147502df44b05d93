"""`ctrak bench`: issue 5's benchmark in one run on the same inputs - a table and --json.

Sections: the toy model (all parameters) and an SD-shaped UNet (attn2): naive reference vs
default path seconds per sample, forward-equivalents and efficiency; quality retention vs exact
scores on the synthetic world (toy); bytes per sample; peak memory of featurize and of a query
at two sizes; the streaming query scan vs a memory copy; Fisher merge. The measuring code is in
`pipeline.bench`; targets are read off the table, never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger("ctrak.bench")
SECTIONS = ("toy", "sd", "query", "memory", "index", "device", "index-1e7")  # run order
# "device": the prepared accelerator run (--model-config); "index-1e7": --index-1e7 (long)
DEFAULT_SECTIONS = SECTIONS[:5]
# option: (default run, --quick, meaning)
PRESETS: dict[str, tuple[int, int, str]] = {
    "batch_size": (8, 2, "featurize batch of both paths"),
    "naive_samples": (8, 1, "training samples timed on the naive path"),
    "naive_k": (2048, 512, "naive dense projection dimension"),
    "sd_samples": (8, 2, "SD-shaped samples timed on the default path"),
    "train_per_combo": (10, 1, "quality world: training images per combination (3 combos)"),
    "query_images": (2, 1, "generated images per query prompt"),
    "query_candidates": (4, 1, "images drawn per prompt to pick classified ones from"),
    "forward_reps": (5, 2, "forward timings after each default batch"),
    "query_rows": (1_000_000, 20_000, "rows of the synthetic feature store"),
    "memory_samples": (4, 2, "featurize memory: N and 4N samples, batches of N"),
    "merge_shards": (32, 4, "Fisher: 1000-row shards merged (scaled to 1M rows)"),
    "gram_rows": (16_384, 2_048, "Fisher: rows of the timed partial Gram"),
    "device_samples": (16, 2, "--model-config run: samples timed per dtype"),
    "index_rows": (1_000_000, 5_000, "index: rows of the synthetic mixture store"),
    "index_large_rows": (10_000_000, 20_000, "index-1e7: rows of the large mixture store"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark speed, quality, storage, memory and query scan (issue 5)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds to a minute)")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--toy-model", help="toy model directory (default ctrak/assets/toy-paper)")
    parser.add_argument(
        "--only",
        help=f"subset of {SECTIONS} (default: {','.join(DEFAULT_SECTIONS)}; device with "
        "--model-config)",
    )
    parser.add_argument(
        "--model-config",
        choices=["sd15", "sd-shaped", "tiny"],
        help="the device section's UNet: sd15 = Stable Diffusion 1.5's full-size layout, "
        "random weights, 64x64 latents (pipeline/bench/device.py)",
    )
    parser.add_argument("--device", default="cpu", help="device section: cpu or cuda")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="device section dtypes")
    parser.add_argument("--query-k", type=int, default=1024, help="store feature dim")
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed)")
    parser.add_argument(
        "--index-1e7", action="store_true", help="add the 10^7-row index section (~1 hour)"
    )
    parser.add_argument(
        "--index-eval",
        default="runs/eval",
        help="folder of `ctrak eval --index` query files for the toy recall rows (runs/eval)",
    )
    parser.add_argument("--index-codes", default="sq4", help="index codes (default sq4)")
    for name, (full, quick, meaning) in PRESETS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(
            flag, type=int, help=f"{meaning} (default {full:,}; {quick:,} with --quick)"
        )
    parser.set_defaults(func=run)


def _options(args: argparse.Namespace) -> dict[str, object]:
    keys = ("threads", "query_k", "quick", "toy_model", "device", "index_eval", "index_codes")
    opts = {k: getattr(args, k) for k in keys}
    opts["model_config"] = args.model_config or "sd15"
    opts["dtypes"] = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name, (full, quick, _) in PRESETS.items():
        value = getattr(args, name)
        opts[name] = value if value is not None else (quick if args.quick else full)
    only = args.only or ("device" if args.model_config else ",".join(DEFAULT_SECTIONS))
    chosen = {s.strip() for s in only.split(",") if s.strip()}
    if args.index_1e7:
        chosen.add("index-1e7")
    opts["only"] = [s for s in SECTIONS if s in chosen] + sorted(chosen - set(SECTIONS))
    return opts


def run(args: argparse.Namespace) -> int:
    import torch

    from ctrak.errors import ConfigError
    from pipeline.bench import report, suite

    opts = _options(args)
    unknown = sorted(set(opts["only"]) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"--only {unknown} not among {list(SECTIONS)}")
    bad = [d for d in opts["dtypes"] if d not in ("bfloat16", "float32")]
    if bad or not opts["dtypes"]:
        raise ConfigError(f"--dtypes {bad or '(none)'}: give bfloat16 and/or float32")
    small = [name for name in ("threads", "query_k", *PRESETS) if opts[name] < 1]
    if small:
        raise ConfigError(f"--{small[0].replace('_', '-')} {opts[small[0]]} must be >= 1")
    torch.set_num_threads(opts["threads"])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ctrak-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    try:
        results, rows = suite.run_all(opts, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds_total"] = time.perf_counter() - begin
    results["environment"] = report.environment(opts["threads"])
    results["options"] = opts
    results["rows"] = [row.as_dict() for row in rows]
    env = results["environment"]
    print(
        f"ctrak bench  {env['date_utc']}  torch {env['torch']}  threads {env['torch_threads']}  "
        f"{env['cpu']} x{env['cpu_count']}  load {env['load_average_1m']}  "
        f"{results['seconds_total']:.0f} s"
    )
    for name, description in results.get("models", {}).items():
        print(f"  {name}: {description}")
    print(f"  seconds per section: {results.get('section_seconds')}")
    print(report.table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        log.info("wrote %s", args.json)
    return 0
