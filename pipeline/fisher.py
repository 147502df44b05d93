"""The store's Fisher: merge the per-shard partial Grams, factorise with damping, store.

    K = sum_s Phi_s^T Phi_s            (shards in sorted id order, float64)
    lambda = r * 0.1 * trace(K) / k,   L = chol(K + lambda I)        (docs/method.md eqs. 2-3)

Home of the Fisher artifact:

    <store>/fisher/kernel.npz   K (k, k), L (k, k), lambda
    <store>/fisher/fisher.json  marker, written LAST: the shards K covers ({id: gram sha256}),
                                rows, damping ratio, lambda, and the npz's sha256

`update_fisher` is incremental: when the stored K covers a subset of the finished shards with
the same Gram checksums, only the new shards' Grams are added (in sorted order, so featurizing
shards 0..n-1 in one run or in several gives the same sums in the same order); otherwise it
re-merges every shard. A query refuses a Fisher that does not cover exactly the finished
shards (StaleFisherError), and refits L when its damping ratio differs from the stored one.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import torch

from ctrak.kernel import Kernel, fit_kernel
from pipeline.errors import StaleFisherError, StoreCorruptError
from pipeline.storage import sha256
from pipeline.store import FeatureStore, ShardEntry

log = logging.getLogger("ctrak.fisher")


def fisher_info(store: FeatureStore) -> dict | None:
    """fisher/fisher.json, or None when no Fisher was stored yet."""
    path = store.path("fisher", "fisher.json")
    return store.read_json(path) if store.has(path) else None


def load_kernel(store: FeatureStore, info: dict) -> Kernel:
    """The stored K, lambda and L (verified against the marker's checksum)."""
    data = store.read(store.path("fisher", "kernel.npz"))
    if sha256(data) != info["kernel_sha256"]:
        raise StoreCorruptError(
            f"{store.uri}/fisher/kernel.npz does not match the checksum in fisher.json "
            "(truncated or altered); delete fisher/fisher.json and run `ctrak reindex` to "
            "re-merge the Fisher from the shards' Grams"
        )
    arrays = np.load(io.BytesIO(data))
    return Kernel(
        K=torch.from_numpy(arrays["K"]),
        lam=float(arrays["lam"]),
        chol=torch.from_numpy(arrays["L"]),
    )


def save_fisher(
    store: FeatureStore, kernel: Kernel, shards: dict[str, str], rows: int, ratio: float
) -> dict:
    """Write kernel.npz, then fisher.json (the marker) last."""
    buffer = io.BytesIO()
    np.savez(buffer, K=kernel.K.numpy(), L=kernel.chol.numpy(), lam=np.float64(kernel.lam))
    data = buffer.getvalue()
    store.write(store.path("fisher", "kernel.npz"), data)
    info = {
        "shards": shards,
        "rows": rows,
        "k": kernel.k,
        "damping_ratio": ratio,
        "lambda": kernel.lam,
        "kernel_sha256": sha256(data),
    }
    body = json.dumps(info, indent=1, sort_keys=True) + "\n"
    store.write(store.path("fisher", "fisher.json"), body.encode())
    return info


def update_fisher(
    store: FeatureStore, ratio: float, entries: dict[str, ShardEntry] | None = None
) -> tuple[dict, int]:
    """Bring the stored Fisher up to date with the finished shards.

    Returns (fisher.json content, number of shard Grams read); 0 Grams and no write when it
    is already current or the store has no finished shard. `entries`: the finished shards'
    markers when the caller holds them (else they are read)."""
    entries = store.entries() if entries is None else entries
    if not entries:
        return {}, 0  # nothing finished yet: no Fisher to build
    current = {s: e.files["gram"]["sha256"] for s, e in entries.items()}
    rows = sum(e.rows for e in entries.values())
    info = fisher_info(store)
    if info is not None and info["shards"] == current and info["damping_ratio"] == ratio:
        return info, 0
    # 1. start from the stored K when it covers a subset of the shards, unchanged
    old = info["shards"] if info is not None else {}
    incremental = bool(old) and all(current.get(s) == h for s, h in old.items())
    if incremental:
        K = load_kernel(store, info).K.numpy().copy()
        new = sorted(set(current) - set(old))
    else:
        k = int(store.metadata()["k"])
        K = np.zeros((k, k), np.float64)
        new = sorted(current)
    # 2. add the partial Grams, in sorted shard order
    for shard in new:
        K += store.load_gram(entries[shard])
    # 3. factorise K + lambda I
    kernel = fit_kernel(torch.from_numpy(K), ratio)
    log.info(
        "fisher: %d shard Gram(s) added (%s), lambda=%.4g",
        len(new),
        "incremental" if incremental else "full merge",
        kernel.lam,
    )
    return save_fisher(store, kernel, current, rows, ratio), len(new)


def current_kernel(store: FeatureStore, ratio: float) -> tuple[Kernel, dict]:
    """The Fisher of exactly the finished shards, factorised with damping ratio `ratio`."""
    info = fisher_info(store)
    done = store.done_ids()
    if info is None or sorted(info["shards"]) != done:
        have = 0 if info is None else len(info["shards"])
        raise StaleFisherError(
            f"the Fisher of {store.uri} covers {have} shard(s) but {len(done)} are finished; "
            "run `ctrak reindex` with this store to refresh it"
        )
    kernel = load_kernel(store, info)
    if ratio != info["damping_ratio"]:
        kernel = fit_kernel(kernel.K, ratio)  # another damping: refactorise the stored K
    return kernel, info
