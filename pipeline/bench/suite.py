"""The benchmark run: each section measures on shared inputs and adds its table rows.

toy    - naive vs default speed, FE, efficiency; quality vs exact scores (synthetic world)
sd     - naive vs default speed, FE, efficiency on the SD-shaped UNet (attn2)
query  - bytes per sample; a synthetic 1M x k store: the product scan with 8 queries and with
         1 query vs a memory copy (and vs the screen's arithmetic alone), its exactness, its peak
         RSS at 1/4 and all of the store (8 queries); Fisher merge
memory - peak RSS of featurize (toy, N and 4N samples)
index  - the vector index on a synthetic mixture store (recall@10 vs exact, latency, bytes,
         build) and on the worlds `ctrak eval --index` saved; FAISS flat scan vs the screen
index-1e7 - (opt-in, --index-1e7) the same at 10^7 rows
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.bench import device, memory, models, quality, scan, speed
from pipeline.bench.report import Row
from pipeline.scan import native

log = logging.getLogger("ctrak.bench")

TARGETS = {
    "speedup_toy": 10.0,  # issue 19 (the 20x of issue 5 came from a mis-costed sketch)
    "speedup_sd": 10.0,
    "efficiency": 0.8,
    "fe_per_sample": 18,  # issue 19: a third of the 54 of the 9-timestep default
    "bytes_per_sample": 2048,
    "scan_ratio": 0.5,
    "memory_ratio": 1.1,  # "flat": the peak at 4x the size within 10% of the smaller one
}
SD_SIZES = {
    False: {
        "latent_size": 16,
        "block_out_channels": (32, 64, 128, 128),
        "cross_attention_dim": 128,
    },
    True: {"latent_size": 8, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32},
}


def speed_rows(section: str, s: dict, target: float) -> list[Row]:
    fe = s["default"]["fe_analytic"]["total"]
    naive_fe = s["naive"]["fe_analytic"]["total"]
    naive_k = s["naive"]["config"]["projection_k"]
    c = s["default"]["config"]
    what = (
        f"factored k={c['projection_k']}, {c['inversion_steps']}-step inversion "
        f"(eps at {c.get('inversion_eps_at', 'next')}), DPS {c.get('dps', 'exact')}, "
        f"timesteps {','.join(map(str, c['timesteps']))}"
    )
    return [
        Row(
            section,
            "naive reference s/sample",
            s["naive"]["s_per_sample"],
            "s",
            note=f"exact path, 50-step CFG 7.5 inversion, dense JL k={naive_k} "
            f"regenerated per batch; {s['naive']['samples']} samples, batch {s['batch_size']}; "
            f"{naive_fe} FE analytic",
        ),
        Row(
            section,
            "default path s/sample",
            s["default"]["s_per_sample"],
            "s",
            note=f"{what}; {s['default']['samples']} samples after a 2-sample warm-up",
        ),
        Row(section, "speedup naive / default", s["speedup"], "x", target),
        Row(section, "FE per sample, analytic", fe, "fwd"),
        Row(
            section,
            "FE per sample, counted by hooks",
            s["default"]["fe_counted"],
            "fwd",
            TARGETS["fe_per_sample"],
            "<=",
        ),
        Row(
            section,
            "batched forward s/sample",
            s["forward_s_per_sample"],
            "s",
            note=f"no grad, batch {s['batch_size']}, {len(s['forward_s_per_sample_samples'])} "
            "timings interleaved with the default batches; min "
            f"{min(s['forward_s_per_sample_samples']):.4g}",
        ),
        Row(
            section, "efficiency FE*fwd / s_per_sample", s["efficiency"], "", TARGETS["efficiency"]
        ),
        Row(section, "measured cost in forwards", s["fe_measured"], "fwd"),
    ]


def quality_rows(q: dict, trained: bool) -> list[Row]:
    m, section = q["mean"], "toy quality"
    note = (
        f"{q['train_samples']} training images, {len(q['per_query'])} local queries "
        f"({q['query_images_per_prompt']} generated image(s) each; classified as the prompt: "
        f"{q['query_images_matching_prompt']})"
    )
    return [
        Row(section, "Spearman default vs exact", m["spearman_default"], note=note),
        Row(section, "top-10 overlap default vs exact", m["top10_overlap_default"]),
        Row(
            section,
            "Spearman dense small layers vs exact",
            m["spearman_dense_small"],
            note=f"default with dense_below={q['dense_below']}: small layers skip the factors",
        ),
        Row(section, "top-10 overlap dense small layers vs exact", m["top10_overlap_dense_small"]),
        Row(section, "Spearman dense JL (same k) vs exact", m["spearman_dense_jl"]),
        Row(section, "top-10 overlap dense JL vs exact", m["top10_overlap_dense_jl"]),
        Row(
            section,
            "Spearman naive vs exact",
            m["spearman_naive"],
            note="naive = other inversion settings: context, not retention",
        ),
        Row(section, "P@10 exact (unprojected)", m["p@10_exact"]),
        Row(section, "P@10 naive reference", m["p@10_naive"]),
        Row(section, "P@10 default", m["p@10_default"]),
        Row(section, "P@10 dense small layers", m["p@10_dense_small"]),
        Row(
            section,
            "P@10 default - naive",
            m["p@10_default"] - m["p@10_naive"],
            target=0.0 if trained else None,
            note="" if trained else "random-weight toy model: P@10 is chance, no verdict",
        ),
    ]


def run_toy(spec: models.ModelSpec, opts: dict) -> tuple[dict, list[Row]]:
    from ctrak.model import DiffusionModel

    model = DiffusionModel.load(spec.path)
    n = 3 * opts["train_per_combo"]
    images, captions, labels = models.world_images(0, n, model.image_size)
    log.info("toy: timing default (%d samples) and naive (%d samples)", n, opts["naive_samples"])
    s, features, naive_features = speed.measure_speed(
        model,
        spec.params,
        images,
        captions,
        batch_size=opts["batch_size"],
        naive_samples=min(opts["naive_samples"], n),
        naive_k=opts["naive_k"],
        forward_reps=opts["forward_reps"],
    )
    log.info("toy: quality vs exact scores")
    q = quality.measure_quality(
        model,
        spec.params,
        images,
        captions,
        labels,
        features,
        naive_features,
        batch_size=opts["batch_size"],
        naive_k=opts["naive_k"],
        query_count=opts["query_images"],
        query_candidates=opts["query_candidates"],
    )
    rows = speed_rows("toy (all params)", s, TARGETS["speedup_toy"]) + quality_rows(q, spec.trained)
    return {"speed": s, "quality": q}, rows


def run_sd(workdir: Path, opts: dict) -> tuple[dict, list[Row], str]:
    from ctrak.model import DiffusionModel

    spec = models.sd_shaped_model(workdir, **SD_SIZES[bool(opts["quick"])])
    model = DiffusionModel.load(spec.path)
    images, captions, _ = models.world_images(0, opts["sd_samples"], model.image_size)
    log.info("sd: timing default (%d samples) and naive", opts["sd_samples"])
    s, _, _ = speed.measure_speed(
        model,
        spec.params,
        images,
        captions,
        batch_size=opts["batch_size"],
        naive_samples=min(opts["naive_samples"], len(captions)),
        naive_k=opts["naive_k"],
        forward_reps=opts["forward_reps"],
    )
    return {"speed": s}, speed_rows("sd-shaped (attn2)", s, TARGETS["speedup_sd"]), spec.description


def _scan_rates(run: dict, k: int, bandwidth: float) -> dict[str, float]:
    """A timed scan {"rows", "seconds"} of float16 rows of k -> rows/s, feature bytes/s and
    their ratio to the copy bandwidth."""
    rate = run["rows"] / run["seconds"]
    return {
        "rows_per_s": rate,
        "scan_bytes_per_s": rate * k * 2,
        "ratio_to_copy": rate * k * 2 / bandwidth,
    }


def scan_rows(q: int, run: dict, ceiling: dict) -> list[Row]:
    """The scan with q queries: rows/s, bandwidth, its ratio to the copy measured beside it (the
    target) and the screen's arithmetic ceiling's ratio (q queries cost 2 q k FLOP per row;
    against the main process's copy)."""
    label = f"{q} quer{'y' if q == 1 else 'ies'}"
    kernel = native.status()
    if q == 1:
        path = "float16 matrix-vector"
    elif kernel.available:
        path = "fused float16 -> float32 FMA kernel, pipeline.scan.native"
    else:
        path = f"float16 -> float32 in cache, float32 matmul (no native kernel: {kernel.reason})"
    return [
        Row("query", f"scan rows/s, {label}", run["rows_per_s"], "rows/s"),
        Row(
            "query",
            f"scan bandwidth (feature bytes), {label}",
            run["scan_bytes_per_s"] / 1e9,
            "GB/s",
        ),
        Row(
            "query",
            f"scan / copy bandwidth, {label}",
            run["ratio_to_copy"],
            "",
            TARGETS["scan_ratio"],
            note="the copy measured in the scan's process just before it (np.copyto of the "
            f"store's feature bytes: {run['copy_beside_scan_bytes_per_s'] / 1e9:.3g} GB/s); "
            "median of 3 rounds by ratio, each round's: "
            + ", ".join(f"{r['ratio']:.3g}" for r in run["rounds"]),
        ),
        Row(
            "query",
            f"screen arithmetic alone / copy bandwidth, {label}",
            ceiling["ratio_to_copy"],
            note=f"the scan's ceiling: pipeline.scan.screen.screen ({path}), {2 * q} FLOP per "
            f"2-byte feature element, on {ceiling['rows']:,} float16 rows in memory, no decode: "
            f"{ceiling['gflop_per_s']:.3g} GFLOP/s, {ceiling['rows_per_s']:.3g} rows/s",
        ),
    ]


def run_query(workdir: Path, opts: dict) -> tuple[dict, list[Row]]:
    """Bytes per sample; the product scan of a synthetic store with 8 queries (memory at 1/4
    and all of it, timed on all of it) and with 1 query (timed on all of it), top-k checked
    against float64 on one file, each vs a memory copy and vs the screen's arithmetic alone;
    Fisher merge. All single-threaded (--threads)."""
    from ctrak.config import ProjectionConfig
    from pipeline.config import JobConfig

    rows, k, q, top, threads = opts["query_rows"], opts["query_k"], 8, 10, opts["threads"]
    file_rows = min(10_000, max(1, rows // 8))
    log.info("query: writing a %d x %d store in the product format", rows, k)
    store = scan.write_store(workdir / "store", rows, k, file_rows)
    try:
        copy = scan.copy_bandwidth(rows * k * 2)
        bandwidth = copy["median"]
        log.info("query: scan memory at 1/4 and all of the store; timed scans, 8 and 1 queries")
        files = store["files"]
        product = memory.measure_query(files, max(1, len(files) // 4), k, q, top, threads)
        timed = memory.measure_scan(files, k, q, top, threads)
        single = memory.measure_scan(files, k, 1, top, threads)
        exact = {n: scan.check_exact(files, scan.query_vectors(k, n), top) for n in (q, 1)}
    finally:
        shutil.rmtree(workdir / "store", ignore_errors=True)
    product.update(
        queries=q,
        rows=timed["rows"],
        **_scan_rates(timed, k, timed["copy_bytes_per_s"]),
        copy_beside_scan_bytes_per_s=timed["copy_bytes_per_s"],
        rounds=timed["rounds"],
        copy_bytes_per_s=bandwidth,
        copy_bytes_per_s_best=copy["best"],
        top_agreement_with_float64=exact[q],
    )
    single.update(queries=1, **_scan_rates(single, k, single["copy_bytes_per_s"]))
    single["copy_beside_scan_bytes_per_s"] = single.pop("copy_bytes_per_s")
    single["top_agreement_with_float64"] = exact[1]
    log.info("query: screen arithmetic ceiling (%d and 1 queries), Fisher merge", q)
    ceiling = {n: scan.measure_ceiling(k, n, min(rows, 50_000)) for n in (q, 1)}
    for c in ceiling.values():
        c["ratio_to_copy"] = c["bytes_per_s"] / bandwidth
    fisher = scan.measure_fisher(
        workdir,
        k,
        gram_rows=opts["gram_rows"],
        merge_shards=opts["merge_shards"],
        shard_rows=1000,
    )
    default_k, dtype = ProjectionConfig().k, JobConfig().feature_dtype
    feature_bytes = default_k * np.dtype(dtype).itemsize
    disk = store["bytes_on_disk"] / rows
    (small, large), ratio = product["runs"], product["peak_ratio"]
    out = [
        Row(
            "storage",
            "feature bytes per sample",
            feature_bytes,
            "B",
            TARGETS["bytes_per_sample"],
            "<=",
            note=f"k={default_k} x {dtype}",
        ),
        Row(
            "storage",
            "Parquet bytes per row on disk",
            disk,
            "B",
            note="pipeline.store layout and writer: 2k feature bytes (fixed_size_binary, "
            "uncompressed) + 4 B feature_norm + key/row/caption/metadata (snappy)",
        ),
        Row(
            "query",
            "store rows scanned",
            product["rows"],
            "rows",
            note=f"k={k}, top-{top}, timed with {q} queries and with 1 query, each in its own "
            "process without the memory probes; pipeline.scan.scanner score_files + gather, one "
            "process, no Ray, files memory-mapped from the page cache (mapping not timed)",
        ),
        Row(
            "query",
            "memory copy bandwidth (np.copyto)",
            bandwidth / 1e9,
            "GB/s",
            note=f"median of {copy['buffer_bytes'] >> 20} MB copies over the store's bytes; "
            f"best {copy['best'] / 1e9:.3g}",
        ),
        *scan_rows(q, product, ceiling[q]),
        *scan_rows(1, single, ceiling[1]),
        Row(
            "query",
            "scan top-k == float64 top-k",
            min(exact.values()),
            note=f"fraction of the top-{top} rows of one file that agree with dense float64 "
            f"scores (ctrak.kernel.scores + ctrak.topk): {q} queries {exact[q]:.4g}, "
            f"1 query {exact[1]:.4g}",
        ),
        Row("query", f"query peak RSS, {small['rows']:,} rows", small["peak_rss_mb"], "MB"),
        Row("query", f"query peak RSS, {large['rows']:,} rows", large["peak_rss_mb"], "MB"),
        Row("query", "query peak ratio (flat = 1)", ratio, "", TARGETS["memory_ratio"], "<="),
        Row(
            "query",
            "query peak growth per 1M rows",
            (large["peak_rss_mb"] - small["peak_rss_mb"]) * 1e6 / (large["rows"] - small["rows"]),
            "MB",
            note=f"the features are {k * 2 * 1e6 / 2**20:,.0f} MB per 1M rows; peak after "
            f"tenths of the full scan: {large['peak_after_files_mb']}",
        ),
        Row(
            "fisher",
            "partial Gram s per 1M rows",
            fisher["gram_s_per_1m_rows"],
            "s",
            note=f"ctrak.kernel.gram (float64) on {fisher['gram_rows_measured']:,} rows",
        ),
        Row(
            "fisher",
            "merge s per 1M rows",
            fisher["merge_s_per_1m_rows"],
            "s",
            note="pipeline.fisher.update_fisher, 1000-row shards "
            f"({fisher['merge_shards_measured']} measured), plus one factorisation",
        ),
        Row("fisher", "Gram + merge s per 1M rows", fisher["total_s_per_1m_rows"], "s"),
    ]
    results = {
        "store": {key: v for key, v in store.items() if key != "files"},
        "product_scan": product,
        "product_scan_1_query": single,
        "arithmetic_ceiling": ceiling[q],
        "arithmetic_ceiling_1_query": ceiling[1],
        "fisher": fisher,
        "feature_bytes_per_sample": feature_bytes,
        "parquet_bytes_per_row": disk,
    }
    return results, out


def run_memory(toy: models.ModelSpec, opts: dict) -> tuple[dict, list[Row]]:
    n = opts["memory_samples"]
    log.info("memory: featurize %d and %d samples (fresh processes)", n, 4 * n)
    feat = memory.measure_featurize_memory(
        str(toy.path), toy.params, (n, 4 * n), n, opts["threads"]
    )
    small, large = feat["runs"]
    rows = [
        Row(
            "memory",
            f"featurize peak RSS, {n} samples",
            small["peak_rss_mb"],
            "MB",
            note=f"batches of {n} after a 2-image warm-up (projection caches built); "
            f"peak after each batch of the {4 * n}: {large['peak_after_each_batch_mb']}",
        ),
        Row("memory", f"featurize peak RSS, {4 * n} samples", large["peak_rss_mb"], "MB"),
        Row(
            "memory",
            "featurize peak ratio 4N / N (flat = 1)",
            feat["peak_ratio"],
            "",
            TARGETS["memory_ratio"],
            "<=",
        ),
    ]
    return {"featurize": feat}, rows


def run_all(opts: dict, workdir: Path) -> tuple[dict, list[Row]]:
    """Run the sections named in opts["only"], in that order -> (results, rows)."""
    only = opts["only"]
    results: dict[str, object] = {"models": {}}
    rows: list[Row] = []
    toy = None
    if {"toy", "memory"} & set(only):
        toy = models.toy_model(workdir, opts["toy_model"], bool(opts["quick"]))
        results["models"]["toy"] = toy.description
    seconds: dict[str, float] = {}
    for name in only:
        begin = time.perf_counter()
        if name == "toy":
            results["toy"], new = run_toy(toy, opts)
        elif name == "sd":
            results["sd"], new, results["models"]["sd"] = run_sd(workdir, opts)
        elif name == "query":
            results["query"], new = run_query(workdir, opts)
        elif name == "device":
            results["device"], new, results["models"]["device"] = device.run_device(workdir, opts)
        elif name in ("index", "index-1e7"):
            from pipeline.bench.index import run_index

            size = int(opts["index_rows"] if name == "index" else opts["index_large_rows"])
            results[name], new = run_index(opts, size, name)
        else:
            results["memory"], new = run_memory(toy, opts)
        rows += new
        seconds[name] = round(time.perf_counter() - begin, 1)
    results["section_seconds"] = seconds
    return results, rows
