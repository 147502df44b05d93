"""A synthetic feature store of any size, fitted to real features, never held in memory.

An IVF index over white noise measures nothing (every list is as good as any other), so the
large synthetic store is a Gaussian mixture fitted to a real store's features:

    phi_i = mu_c + U (s_c * z_i) + sigma_c eps_i,   c ~ Categorical(w),
    z_i ~ N(0, I_r),  eps_i ~ N(0, I_k),  stored as float16 (the store's dtype)

1. the real features' top-r principal directions U (k, r) (SVD of the centred rows);
2. C clusters of the real rows (FAISS k-means): weight w_c, mean mu_c (k,);
3. per cluster, s_c (r,) = the std of its rows along U, sigma_c = the rms of what U leaves.

Rows are generated in chunks of CHUNK rows, chunk j from its own seed ([seed, j]), so any
chunk - and so any row - is regenerated on its own: the exact reference scans and the rescore
of an index's candidates regenerate rows instead of storing 2 bytes x k per row.
Query vectors: g = a draw of the same mixture (another seed), x = (K + lambda I)^-1 g with
K = N E[phi phi^T] (the mixture's second moment, analytic) and lambda = 0.1 trace(K) / k
(`ctrak.kernel.fit_kernel` at damping ratio 1), as `pipeline.query` solves a query.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CHUNK = 64  # rows per generator seed: regenerating one costs ~0.3 ms at k = 1024


@dataclass(frozen=True)
class Mixture:
    weights: np.ndarray  # (C,) float64, sums to 1
    means: np.ndarray  # (C, k) float32
    basis: np.ndarray  # (k, r) float32, orthonormal columns
    scales: np.ndarray  # (C, r) float32
    noise: np.ndarray  # (C,) float32

    @property
    def k(self) -> int:
        return self.means.shape[1]

    def describe(self) -> str:
        return (
            f"Gaussian mixture, {len(self.weights)} components, rank {self.basis.shape[1]} + "
            f"isotropic noise, k={self.k}"
        )


def fit_mixture(features: np.ndarray, components: int = 32, rank: int = 64, seed: int = 0):
    """Real features (n, k) -> the Mixture fitted to them (module docstring, steps 1-3)."""
    import faiss

    phi = np.ascontiguousarray(features, np.float32)
    n, k = phi.shape
    rank = min(rank, n - 1, k)
    # 1. principal directions of the centred rows
    centred = phi - phi.mean(0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    basis = np.ascontiguousarray(vt[:rank].T, np.float32)  # (k, r)
    # 2. clusters
    kmeans = faiss.Kmeans(k, components, niter=20, seed=seed, verbose=False)
    kmeans.train(phi)
    _, labels = kmeans.index.search(phi, 1)
    labels = labels[:, 0]
    # 3. per-cluster spread along U and off it
    weights = np.bincount(labels, minlength=components).astype(np.float64)
    means = np.zeros((components, k), np.float32)
    scales = np.zeros((components, rank), np.float32)
    noise = np.zeros(components, np.float32)
    for c in range(components):
        rows = phi[labels == c]
        if len(rows) == 0:
            continue
        means[c] = rows.mean(0)
        d = rows - means[c]
        along = d @ basis  # (n_c, r)
        scales[c] = along.std(0) if len(rows) > 1 else 0.0
        rest = d - along @ basis.T
        noise[c] = np.sqrt((rest**2).mean())
    return Mixture(weights / weights.sum(), means, basis, scales, noise)


def chunk_rows(m: Mixture, seed: int, chunk: int) -> np.ndarray:
    """Chunk `chunk`'s CHUNK rows (CHUNK, k) float16, the same on every call."""
    rng = np.random.default_rng([seed, chunk])
    comp = rng.choice(len(m.weights), size=CHUNK, p=m.weights)  # (CHUNK,)
    z = rng.standard_normal((CHUNK, m.basis.shape[1]), dtype=np.float32) * m.scales[comp]
    eps = rng.standard_normal((CHUNK, m.k), dtype=np.float32)
    rows = m.means[comp] + z @ m.basis.T + m.noise[comp, None] * eps
    return rows.astype(np.float16)


def blocks(m: Mixture, seed: int, start: int, stop: int, rows: int) -> Iterator[np.ndarray]:
    """Rows start..stop (a multiple of CHUNK apart) in blocks of `rows` rows (n_b, k) float16."""
    per = max(rows // CHUNK, 1)
    first, last = start // CHUNK, -(-stop // CHUNK)
    for c in range(first, last, per):
        block = np.concatenate([chunk_rows(m, seed, j) for j in range(c, min(c + per, last))])
        yield block[: stop - c * CHUNK] if (c + per) * CHUNK > stop else block


def rows_at(m: Mixture, seed: int, ids: np.ndarray) -> np.ndarray:
    """The rows `ids` (n,) -> (n, k) float16, each chunk regenerated once."""
    out = np.empty((len(ids), m.k), np.float16)
    chunk = ids // CHUNK
    for c in np.unique(chunk):
        where = np.nonzero(chunk == c)[0]
        out[where] = chunk_rows(m, seed, int(c))[ids[where] % CHUNK]
    return out


def second_moment(m: Mixture) -> np.ndarray:
    """E[phi phi^T] (k, k) float64 of one row (before the float16 rounding)."""
    means = m.means.astype(np.float64)
    basis = m.basis.astype(np.float64)
    moment = (means * m.weights[:, None]).T @ means
    spread = (m.weights[:, None] * m.scales.astype(np.float64) ** 2).sum(0)  # (r,)
    moment += (basis * spread) @ basis.T
    moment += np.eye(m.k) * float((m.weights * m.noise.astype(np.float64) ** 2).sum())
    return moment


def query_vectors(m: Mixture, n_rows: int, q: int, seed: int) -> np.ndarray:
    """x = (K + lambda I)^-1 g (q, k) float64 for q mixture draws g (module docstring)."""
    K = n_rows * second_moment(m)
    lam = 0.1 * np.trace(K) / m.k
    g = np.concatenate([chunk_rows(m, seed + 7_000_003, j) for j in range(-(-q // CHUNK))])
    g = g[:q].astype(np.float64)
    return np.linalg.solve(K + lam * np.eye(m.k), g.T).T
