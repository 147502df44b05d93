"""Which lists hold each real eval query's exact top-10, and how many lists a ranking needs to
cover them: IVF's centroid order vs two oracles (the lists' true score spread, the true max).
Usage: python docs/index-scripts/probe_order.py runs/eval/index-queries-paper-concept-trak.npz"""
import numpy as np, faiss, sys
f = np.load(sys.argv[1]); phi = f["features"].astype(np.float32); x = f["x"].astype(np.float64)
n, k = phi.shape; print("rows", n, "queries", len(x))
for nlist in (16, 32):
    km = faiss.Kmeans(k, nlist, niter=20, seed=1, spherical=False); km.train(phi)
    _, a = km.index.search(phi, 1); a = a[:, 0]; c = km.centroids.astype(np.float64)
    s = x @ phi.astype(np.float64).T  # (q, n)
    top = np.argsort(-s, 1)[:, :10]
    def need(rank):  # rank: (q, nlist) list scores -> recall@10 by number of lists probed
        order = np.argsort(-rank, 1)
        rec = []
        for p in range(1, nlist + 1):
            r = [np.isin(a[top[i]], order[i, :p]).mean() for i in range(len(x))]
            rec.append(np.mean(r))
        return np.array(rec)
    ivf = need(x @ c.T)
    mean = np.stack([s[:, a == j].mean(1) for j in range(nlist)], 1)
    std = np.stack([s[:, a == j].std(1) for j in range(nlist)], 1)
    mx = np.stack([s[:, a == j].max(1) for j in range(nlist)], 1)
    ucb = need(mean + 2.5 * std)
    orc = need(mx)
    for name, r in [("ivf centroid", ivf), ("oracle mean+2.5std", ucb), ("oracle max", orc)]:
        print(nlist, name, " ".join(f"{p}:{r[p-1]:.2f}" for p in (1, 2, nlist // 8, nlist // 4, nlist // 2, nlist)))
