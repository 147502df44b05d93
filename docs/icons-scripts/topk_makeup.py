"""What fills toy-icons' top 10 for a held-out combination's shape target (docs/eval-icons.md,
"Where the held-out shape's top 10 go"): Concept-TRAK at the defaults and with the concept
tokens, the dev query images (seed 5000, 4 per held-out combination), the damping ratio r
swept on the kernel alone (the features and query gradients are the defaults').

    python docs/icons-scripts/topk_makeup.py WORK OUT.json

WORK holds the defaults' cached features (`ctrak eval --work WORK` makes them)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig
from ctrak.kernel import fit_kernel, gram, scores, solve
from ctrak.model import DiffusionModel
from ctrak.topk import topk
from pipeline.evaluation.labelled import world_bench
from pipeline.evaluation.synthetic_bench import _features, query_images, training_set

MODEL = Path("ctrak/assets/toy-icons")
TESTS = (  # (name, test(hit labels, the query's shape, the query's colour))
    ("shape", lambda h, s, c: h["shape"] == s),
    ("query colour", lambda h, s, c: h["colour"] == c),
    ("shape, other colour", lambda h, s, c: h["shape"] == s and h["colour"] != c),
    ("neither", lambda h, s, c: h["shape"] != s and h["colour"] != c),
)
work, out = Path(sys.argv[1]), Path(sys.argv[2])
model = DiffusionModel.load(MODEL)
bench = world_bench("icons", lambda: training_set(MODEL, work, None))
images, captions, labels = bench.load_rows()
today = Attributor(model, AttributionConfig())
features, _ = _features(today, images, captions, work / "cache")
K = gram(features)
held = [c for c in bench.combos if c.heldout]
queries = query_images(model, bench, 4, seed=5000, combos=[c.caption for c in held])
rows = []
for combo in held:
    shape, colour = combo.values
    imgs = queries[combo.caption]["images"]
    for name, cfg in (("defaults", today.config.query), ("concept tokens", None)):
        if cfg is None:
            cfg = replace(today.config.query, concept_tokens=True)
        g = torch.stack(
            [
                today.query_gradient(Query(combo.caption, concept=shape, image=i[None]), cfg)
                for i in imgs
            ]
        ).cpu()
        for r in (0.1, 0.3, 1.0, 3.0, 10.0) if name == "defaults" else (1.0,):
            top = topk(scores(features, solve(fit_kernel(K, r), g)), 10).indices.tolist()
            hits = [[labels[i] for i in idx] for idx in top]
            tally = {
                key: float(np.mean([[test(h, shape, colour) for h in q] for q in hits]))
                for key, test in TESTS
            }
            rows.append({"prompt": combo.caption, "target": shape, "query": name, "r": r, **tally})
            print(json.dumps(rows[-1]))
out.write_text(
    json.dumps({"queries_per_row": 4, "query_seed": 5000, "rows": rows}, indent=2) + "\n"
)
