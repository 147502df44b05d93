"""Does an IVF over whitened rows w = L^-1 phi (L L^T = K + lambda I) find a whitened query's
top-10? Query in that space: L^T x (x^T phi = (L^T x)^T w). Per-query recall@10, rescore 100."""
import sys, numpy as np, torch
from ctrak.kernel import fit_kernel, gram, scores
from ctrak.topk import topk
from pipeline.index import IndexSpec
from pipeline.index_memory import MemoryIndex, recall
f = np.load(sys.argv[1]); phi = torch.from_numpy(f["features"]).float(); x = torch.from_numpy(f["x"])
exact = topk(scores(phi, x), 10)
kern = fit_kernel(gram(phi), 1.0)
L = kern.chol  # (k, k) lower
w = torch.linalg.solve_triangular(L, phi.double().T, upper=False).T.float()  # (n, k)
xq = (L.T @ x.T).T  # (q, k)
print("check", float((scores(w, xq) - scores(phi, x)).abs().max()), float(scores(phi, x).abs().max()))
s = MemoryIndex(w, IndexSpec(codes=sys.argv[2] if len(sys.argv) > 2 else "sq4"))
for nprobe in (1, 2, 4, 8, 16):
    ids = s.candidates(xq, 100, nprobe)
    got = []
    for i in range(len(x)):
        own = torch.from_numpy(np.unique(ids[i][ids[i] >= 0]))
        got.append(own[topk(scores(phi[own], x[i:i+1]), 10).indices[0]])
    print(s.factory, "nprobe", nprobe, "recall@10", f"{np.mean(recall(torch.stack(got), exact.indices)):.3f}")
