"""The vector index: recall@10 vs the exact scan, latency, bytes, build cost; FAISS's flat scan
vs the product screen.

Synthetic store: `mixture` (a Gaussian mixture fitted to toy-paper's Concept-TRAK features,
MIXTURE_ASSET), rows generated in chunks from a seed and never held: one pass generates each
block, adds it to the index and scores it exactly (float64, x phi^T of the float16 rows) for
the reference top-10 of every query; the candidates' rows are regenerated for the rescore.
Queries: dev (seed 5000) choose the nprobe rule, reported (seed 1000) are reported once.
Latency: the index in memory, one process, `threads` threads; a query = FAISS search of the
`rescore` best candidates + the exact float64 rescore of their rows (already fetched; the
fetch - here a regeneration, in a store a range read of the feature page - is timed apart).
Toy stores: `ctrak eval --index` saves each world's features and solved eval queries
(<work>/index-queries-*.npz); the same default index is built over them and recall@10 taken.
Flat scan: `pipeline.scan.screen.screen` (float16 matrix-vector for 1 query, the C kernel of
`pipeline.scan.native` for 8) vs FAISS IndexScalarQuantizer fp16 inner product vs float16 -> float32
in cache + float32 matmul, over the same float16 rows in memory, best of 3.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import mixture as mx

MIXTURE_ASSET = Path(__file__).with_name("mixture-toy-paper.npz")
TOP = 10
NPROBE_SWEEP = (1, 2, 4, 8, 16, 32, 64)  # as fractions nlist / (64 / p)


def load_mixture(path: Path = MIXTURE_ASSET) -> mx.Mixture:
    with np.load(path) as f:
        return mx.Mixture(
            f["weights"].astype(np.float64),
            f["means"].astype(np.float32),
            f["basis"].astype(np.float32),
            f["scales"].astype(np.float32),
            f["noise"].astype(np.float32),
        )


def save_mixture(m: mx.Mixture, path: Path) -> None:
    np.savez_compressed(
        path,
        weights=m.weights,
        means=m.means.astype(np.float16),
        basis=m.basis.astype(np.float16),
        scales=m.scales.astype(np.float16),
        noise=m.noise,
    )


def _topk_rows(s: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """scores (q, n), ids (n,) -> the top-k (q, k) values and ids (ties: lower id)."""
    order = np.lexsort((np.broadcast_to(ids, s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), ids[order]


def _rescore(m: mx.Mixture, seed: int, ids: np.ndarray, x: np.ndarray) -> tuple[float, float, list]:
    """Candidates ids (q, c) -> (fetch seconds, rescore seconds, top-10 ids per query)."""
    begin = time.perf_counter()
    union = np.unique(ids[ids >= 0])
    phi = mx.rows_at(m, seed, union).astype(np.float64)
    fetched = time.perf_counter()
    best = []
    for i in range(len(ids)):  # each query ranks its own candidates only
        own = np.unique(ids[i][ids[i] >= 0])
        s = x[i : i + 1] @ phi[np.searchsorted(union, own)].T  # (1, c) exact float64
        best.append(_topk_rows(s, own, TOP)[1][0].tolist())
    return fetched - begin, time.perf_counter() - fetched, best


def synthetic(
    m: mx.Mixture, rows: int, *, codes: str, threads: int, rescore: int, seed: int = 11, log=print
) -> dict:
    """Build the default index over `rows` mixture rows; recall, latency, bytes, build cost."""
    import faiss

    from pipeline.index import choose_nlist, default_nprobe, factory_string, from_bytes, train
    from pipeline.index import to_bytes as serialize
    from pipeline.index_query import search

    faiss.omp_set_num_threads(threads)
    dev = mx.query_vectors(m, rows, 16, 5000)
    rep = mx.query_vectors(m, rows, 32, 1000)
    x = np.concatenate([dev, rep])
    # 1. train on a seeded sample of rows
    train_rows = min(65536, rows)
    sample_ids = np.sort(np.random.default_rng(seed).choice(rows, train_rows, replace=False))
    sample = mx.rows_at(m, seed, sample_ids).astype(np.float32)
    nlist = choose_nlist(rows, train_rows)
    factory = factory_string(m.k, nlist, codes, train_rows)
    begin = time.perf_counter()
    index = from_bytes(train(sample, factory, threads))
    train_s = time.perf_counter() - begin
    del sample
    # 2. one pass: generate, add, score exactly
    gen_s = add_s = exact_s = 0.0
    best_s = np.full((len(x), TOP), -np.inf)
    best_i = np.zeros((len(x), TOP), np.int64)
    start = 0
    t = time.perf_counter()
    for block in mx.blocks(m, seed, 0, rows, 65536):
        gen_s += time.perf_counter() - t
        t = time.perf_counter()
        ids = np.arange(start, start + len(block), dtype=np.int64)
        index.add_with_ids(block.astype(np.float32), ids)
        add_s += time.perf_counter() - t
        t = time.perf_counter()
        s = x @ block.astype(np.float64).T
        best_s, best_i = _merge(best_s, best_i, s, ids)
        exact_s += time.perf_counter() - t
        start += len(block)
        if start % 1_000_000 < 65536:
            log(f"index bench: {start} rows ({gen_s:.0f} s gen, {add_s:.0f} s add)")
        t = time.perf_counter()
    size = len(serialize(index))
    # 3. recall per nprobe on the dev queries; the default rule's nprobe on the reported ones
    out = {
        "rows": rows,
        "k": m.k,
        "factory": factory,
        "nlist": nlist,
        "default_nprobe": default_nprobe(nlist),
        "rescore": rescore,
        "mixture": m.describe(),
        "train_rows": train_rows,
        "train_s": train_s,
        "add_s": add_s,
        "generate_s": gen_s,
        "exact_reference_s": exact_s,
        "build_s_per_1e6_rows": (train_s + add_s) / rows * 1e6,
        "bytes_per_row": size / rows,
        "dev_recall": {},
    }
    for frac in NPROBE_SWEEP:
        nprobe = max(nlist * frac // 64, 1)
        _, cand = search(index, dev, nprobe, rescore)
        got = _rescore(m, seed, cand, dev)[2]
        out["dev_recall"][nprobe] = _recall(got, best_i[: len(dev)])
    nprobe = out["default_nprobe"]
    _, cand = search(index, rep, nprobe, rescore)
    out["recall_at_10"] = _recall(_rescore(m, seed, cand, rep)[2], best_i[len(dev) :])
    out["report_queries"] = len(rep)
    # 4. latency: one query at a time (p50 over the reported queries), then 8 at once
    single, fetch = [], []
    for i in range(len(rep)):
        q = rep[i : i + 1]
        begin = time.perf_counter()
        _, cand = search(index, q, nprobe, rescore)
        searched = time.perf_counter() - begin
        fetch_s, rescore_s, _ = _rescore(m, seed, cand, q)
        single.append(searched + rescore_s)
        fetch.append(fetch_s)
    batches = []
    for i in range(0, len(rep), 8):
        q = rep[i : i + 8]
        begin = time.perf_counter()
        _, cand = search(index, q, nprobe, rescore)
        searched = time.perf_counter() - begin
        _, rescore_s, _ = _rescore(m, seed, cand, q)
        batches.append(searched + rescore_s)
    out.update(
        p50_1_query_s=float(np.median(single)),
        p50_8_queries_s=float(np.median(batches)),
        p50_fetch_stand_in_s=float(np.median(fetch)),
        latency_queries=len(single),
    )
    return out


def _merge(best_s, best_i, s, ids):
    both_s = np.concatenate([best_s, s], 1)
    both_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], 1)
    order = np.lexsort((both_i, -both_s), axis=1)[:, :TOP]
    return np.take_along_axis(both_s, order, 1), np.take_along_axis(both_i, order, 1)


def _recall(got: list[list[int]], exact: np.ndarray) -> float:
    return float(
        np.mean([len(set(g) & set(e)) / TOP for g, e in zip(got, exact.tolist(), strict=True)])
    )


def toy_recall(path: Path, codes: str) -> dict:
    """A saved `ctrak eval --index` world: the default index's recall@10 vs the exact top-10."""
    from ctrak.kernel import scores
    from ctrak.topk import topk
    from pipeline.index import IndexSpec
    from pipeline.index_memory import MemoryIndex, recall

    with np.load(path) as f:
        phi, x = torch.from_numpy(f["features"]), torch.from_numpy(f["x"])
    searcher = MemoryIndex(phi, IndexSpec(codes=codes))
    exact = topk(scores(phi.float(), x), TOP)
    found = searcher.topk(x, TOP)
    values = recall(found.indices, exact.indices)
    same = bool(torch.equal(found.values[:, 0], exact.values[:, 0]))
    return {
        "store": path.name,
        "rows": phi.shape[0],
        "queries": len(values),
        "factory": searcher.factory,
        "nprobe": searcher.nprobe,
        "recall_at_10": float(np.mean(values)),
        "min_recall": float(np.min(values)),
        "top1_scores_equal_exact": same,
    }


def flat_scan(rows: int, k: int, threads: int) -> dict:
    """Rows/s of the exact path's screen vs FAISS's fp16 flat scan vs float16->float32 + mm,
    at 1 and 8 queries over the same float16 rows (best of 3)."""
    import faiss

    from pipeline.scan import native
    from pipeline.scan.screen import screen, screen_scores

    faiss.omp_set_num_threads(threads)
    gen = torch.Generator().manual_seed(3)
    phi = torch.randn(rows, k, generator=gen).to(torch.float16)
    blocks = list(torch.split(phi, 10_000))
    sq = faiss.IndexScalarQuantizer(k, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    raw = phi.numpy().view(np.uint8).reshape(-1)  # the float16 bytes = the fp16 codes
    _copy_in(sq, raw)
    norm = float(phi[:1000].float().norm(dim=1).max()) * 2
    out = {"rows": rows, "k": k, "native_built": native.status().available}
    for q in (1, 8):
        x = torch.randn(q, k, generator=gen, dtype=torch.float64)
        x32 = x.float().numpy()
        runs = {
            "ctrak screen": lambda x=x: screen(blocks, x, norm),
            "faiss SQfp16 flat": lambda x32=x32: sq.search(x32, TOP),
            "faiss SQfp16 flat + copy in": lambda x32=x32: _copy_in(sq, raw).search(x32, TOP),
            "fp16->fp32 + mm": lambda x=x: screen_scores(blocks, x.float(), native=False),
        }
        for name, fn in runs.items():
            fn()
            best = float("inf")
            for _ in range(3):
                begin = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - begin)
            out[f"{name}, {q} quer{'y' if q == 1 else 'ies'}"] = rows / best
    return out


def _copy_in(sq, raw: np.ndarray):
    """The float16 rows' bytes copied into the FAISS index's codes (FAISS cannot view them in
    place: the exact path's Parquet pages would be copied once per query)."""
    import faiss

    sq.codes.clear()
    faiss.copy_array_to_vector(raw, sq.codes)
    sq.ntotal = len(raw) // sq.code_size
    return sq


def _synthetic_rows(section: str, s: dict, label: str) -> list:
    from pipeline.bench.report import Row

    sweep = ", ".join(f"{p}: {r:.3f}" for p, r in s["dev_recall"].items())
    where = f"{s['rows']:,} rows of a {s['mixture']}, {s['factory']}, nprobe {s['default_nprobe']}"
    latency = (
        f"{s['latency_queries']} reported queries, index in memory, FAISS search + exact float64 "
        f"rescore of {s['rescore']} candidates; the candidates' row fetch apart (p50 "
        f"{s['p50_fetch_stand_in_s']:.3g} s here, a regeneration)"
    )
    return [
        Row(
            section,
            "index recall@10 vs exact",
            s["recall_at_10"],
            "",
            0.95,
            note=f"{s['report_queries']} reported queries (seed 1000); {where}; dev recall "
            f"(seed 5000) by nprobe {sweep}",
        ),
        Row(section, f"index query p50 s, {label}", s["p50_1_query_s"], "s", 0.1, "<=", latency),
        Row(section, f"index query p50 s, {label}, 8 queries", s["p50_8_queries_s"], "s"),
        Row(section, "index bytes per row", s["bytes_per_row"], "B", note=s["factory"]),
        Row(
            section,
            "index build s per 1e6 rows",
            s["build_s_per_1e6_rows"],
            "s",
            note=f"train {s['train_s']:.1f} s on {s['train_rows']} rows + add {s['add_s']:.1f} s; "
            "row generation not counted",
        ),
    ]


def run_index(opts: dict, rows: int, section: str) -> tuple[dict, list]:
    """The bench's index section at `rows` synthetic rows (+ the saved toy eval worlds and the
    flat-scan comparison in the default section)."""
    from pipeline.bench.report import Row
    from pipeline.index_query import default_rescore

    threads, codes = int(opts["threads"]), str(opts.get("index_codes", "sq4"))
    power = round(np.log10(rows))
    label = f"1e{power} rows" if rows == 10**power else f"{rows:,} rows"
    m = load_mixture()
    results = {
        "synthetic": synthetic(m, rows, codes=codes, threads=threads, rescore=default_rescore(TOP))
    }
    out = _synthetic_rows(section, results["synthetic"], label)
    if section != "index":
        return results, out
    for path in sorted(
        Path(str(opts.get("index_eval") or "runs/eval")).glob("index-queries-*.npz")
    ):
        toy = toy_recall(path, codes)
        results[path.stem] = toy
        out.append(
            Row(
                f"index {path.stem.removeprefix('index-queries-')}",
                "index recall@10 vs exact",
                toy["recall_at_10"],
                "",
                0.95,
                note=f"{toy['queries']} eval queries (ctrak eval --index, seed 1000) over "
                f"{toy['rows']} training rows; {toy['factory']} nprobe {toy['nprobe']}; min "
                f"{toy['min_recall']:.2f}",
            )
        )
    flat = flat_scan(max(int(opts["query_rows"]) // 5, 4096), int(opts["query_k"]), threads)
    results["flat_scan"] = flat
    for name, value in flat.items():
        if isinstance(value, float):
            out.append(
                Row(
                    "index flat scan",
                    f"rows/s {name}",
                    value,
                    "rows/s",
                    note=f"{flat['rows']:,} float16 rows x {flat['k']} in memory, best of 3",
                )
            )
    return results, out
