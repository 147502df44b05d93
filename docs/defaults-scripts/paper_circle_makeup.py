"""What fills toy-paper's top 10 for its trained circle targets, where the concept-attention
option loses ID P@10 (docs/defaults-attention.md): today's defaults and candidate A, the dev
query images (seed 5000, 8 per combination), the defaults' features.

    python docs/defaults-scripts/paper_circle_makeup.py WORK OUT.json"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig
from ctrak.kernel import scores, solve
from ctrak.model import DiffusionModel
from ctrak.topk import topk
from pipeline.evaluation.labelled import world_bench
from pipeline.evaluation.synthetic_bench import _features, query_images, training_set

MODEL = Path("ctrak/assets/toy-paper")
work, out = Path(sys.argv[1]), Path(sys.argv[2])
model = DiffusionModel.load(MODEL)
spec = json.loads((MODEL / "data_spec.json").read_text())
bench = world_bench(spec["world"], lambda: training_set(MODEL, work, None))
images, captions, labels = bench.load_rows()
att = Attributor(model, AttributionConfig())
features, _ = _features(att, images, captions, work / "cache")
kernel = att.fit(features)
shape_key, colour_key = bench.attributes
combos = [c for c in bench.combos if c.values[0] == "circle"]
queries = query_images(model, bench, 8, seed=5000, combos=[c.caption for c in combos])
share = replace(att.config.query, concept_tokens=True, concept_attention=True)
rows = []
for combo in combos:
    shape, colour = combo.values
    imgs = queries[combo.caption]["images"]
    for name, cfg in (("defaults", att.config.query), ("A", share)):
        batch = [Query(combo.caption, concept=shape, image=i[None]) for i in imgs]
        g = torch.stack([att.query_gradient(q, cfg) for q in batch]).cpu()
        top = topk(scores(features, solve(kernel, g)), 10).indices.tolist()
        hits = [labels[i] for idx in top for i in idx]
        wrong = [h for h in hits if h[shape_key] != shape]
        row = {
            "prompt": combo.caption,
            "query": name,
            "hits": len(hits),
            "shape share": float(np.mean([h[shape_key] == shape for h in hits])),
            "wrong hits": len(wrong),
            "wrong hits of the query's colour": sum(h[colour_key] == colour for h in wrong),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
out.write_text(json.dumps(rows, indent=2) + "\n")
