"""Per-query recall@10 of the in-memory index on a saved eval world, by nprobe / rescore."""
import sys, numpy as np, torch
from ctrak.kernel import scores
from ctrak.topk import topk
from pipeline.index import IndexSpec
from pipeline.index_memory import MemoryIndex, recall
f = np.load(sys.argv[1]); phi = torch.from_numpy(f["features"]); x = torch.from_numpy(f["x"])
exact = topk(scores(phi.float(), x), 10)
s = MemoryIndex(phi, IndexSpec(codes="sq4"))
print(s.factory, len(x), "queries")
for nprobe in (1, 2, 4, 8, 16):
    row = [f"{np.mean(recall(s.topk(x, 10, nprobe=nprobe, rescore=r).indices, exact.indices)):.3f}" for r in (100, 300)]
    print("nprobe", nprobe, f"(nlist/{s.nlist // nprobe})", "recall@10 at rescore 100 / 300:", row)
