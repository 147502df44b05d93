"""Local dev P@10 of Concept-TRAK with the query's gradient kept to some attn2 layers (the
training features unchanged): today's defaults, the concept tokens (T), and T with the query
restricted to the text key / value layers (to_k, to_v) - a prototype, patched in here.

    python docs/icons-scripts/query_layers.py WORLD WORK PER_COMBO OUT.json

WORK holds the defaults' cached features (`ctrak eval --work WORK` makes them)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import ctrak.factored as factored
from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig
from ctrak.kernel import scores, solve
from ctrak.model import DiffusionModel
from ctrak.topk import topk
from pipeline.evaluation.labelled import world_bench
from pipeline.evaluation.synthetic_bench import _features, query_images, training_set

world, work, per_combo, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
MODEL = Path(f"ctrak/assets/toy-{world}")
KEEP: set[str] | None = None  # layer names the query keeps (None: all)
_project = factored.layer_projection


def kept_projection(layer, factors, a, delta):
    proj, sq = _project(layer, factors, a, delta)
    if KEEP is not None and layer.name not in KEEP:
        return torch.zeros_like(proj), torch.zeros_like(sq)
    return proj, sq


factored.layer_projection = kept_projection
model = DiffusionModel.load(MODEL)
spec = json.loads((MODEL / "data_spec.json").read_text())
bench = world_bench(spec["world"], lambda: training_set(MODEL, work, None))
images, captions, labels = bench.load_rows()
att = Attributor(model, AttributionConfig())
features, _ = _features(att, images, captions, work / "cache")
kernel = att.fit(features)
queries = query_images(model, bench, per_combo, seed=5000)
text_layers = set(model.text_layer_names())
variants = {
    "defaults": (att.config.query, None),
    "concept tokens": (replace(att.config.query, concept_tokens=True), None),
    "concept tokens, query on to_k/to_v only": (
        replace(att.config.query, concept_tokens=True),
        text_layers,
    ),
}
records = []
for name, (cfg, keep) in variants.items():
    KEEP = keep
    for combo in bench.combos:
        imgs = queries[combo.caption]["images"]
        for attr, value in zip(bench.attributes, combo.values, strict=True):
            g = torch.stack(
                [att.query_gradient(Query(combo.caption, value, image=i[None]), cfg) for i in imgs]
            )
            top = topk(scores(features, solve(kernel, g)), 10).indices.tolist()
            p = [float(np.mean([labels[i][attr] == value for i in idx])) for idx in top]
            records.append(
                {
                    "variant": name,
                    "prompt": combo.caption,
                    "heldout": combo.heldout,
                    "target": value,
                    "attribute": attr,
                    "precision": float(np.mean(p)),
                    "per_query": p,
                }
            )
    KEEP = None
    mine = [r for r in records if r["variant"] == name]
    cell = {
        split: float(np.mean([v for r in mine if r["heldout"] == h for v in r["per_query"]]))
        for split, h in (("ID", False), ("OOD", True))
    }
    held = {f"{r['prompt']} / {r['target']}": r["precision"] for r in mine if r["heldout"]}
    print(json.dumps({"variant": name, **cell, "held out": held}), flush=True)
out.write_text(json.dumps({"world": world, "per_combo": per_combo, "records": records}) + "\n")
