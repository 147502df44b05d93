"""Why `query.partial_rest` (docs/defaults-rest.md) barely moves toy-icons' held-out shape
targets: per dev query image (seed 5000, 4 per held-out combination), beta, the correlation
over the 720 training images of the concept's scores with the rest's, and what fills the top
10 of the concept's scores, of the rest's and of the partialled ones (share with the query's
shape / with the query's colour).

    python docs/defaults-scripts/rest_diagnostic.py WORK OUT.json

WORK holds the defaults' cached features (`ctrak eval --work WORK` makes them)."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig
from ctrak.kernel import partial_out, scores, solve
from ctrak.model import DiffusionModel
from pipeline.evaluation.labelled import world_bench
from pipeline.evaluation.synthetic_bench import _features, query_images, training_set

MODEL = Path("ctrak/assets/toy-icons")
work, out = Path(sys.argv[1]), Path(sys.argv[2])
model = DiffusionModel.load(MODEL)
bench = world_bench("icons", lambda: training_set(MODEL, work, None))
images, captions, labels = bench.load_rows()
attributor = Attributor(model, AttributionConfig())
features, _ = _features(attributor, images, captions, work / "cache")
kernel = attributor.fit(features)
cfg = replace(attributor.config.query, partial_rest=True)
held = [c for c in bench.combos if c.heldout]
queries = query_images(model, bench, 4, seed=5000, combos=[c.caption for c in held])


def makeup(s: torch.Tensor, shape: str, colour: str) -> dict[str, float]:
    top = torch.argsort(s, descending=True, stable=True)[:10].tolist()
    return {
        "shape": float(np.mean([labels[i]["shape"] == shape for i in top])),
        "query colour": float(np.mean([labels[i]["colour"] == colour for i in top])),
    }


rows = []
for combo in held:
    shape, colour = combo.values
    for j, image in enumerate(queries[combo.caption]["images"]):
        query = Query(combo.caption, concept=shape, image=image[None])
        x, x_rest = solve(kernel, attributor.query_directions(query, cfg).cpu())
        s, s_rest = scores(features, torch.stack([x, x_rest]))
        s_net = scores(features, partial_out(kernel.K, x, x_rest)[None])[0]
        beta = float(x @ kernel.K @ x_rest / (x_rest @ kernel.K @ x_rest))
        row = {
            "prompt": combo.caption,
            "image": j,
            "beta": beta,
            "corr": float(np.corrcoef(s.numpy(), s_rest.numpy())[0, 1]),
            "concept": makeup(s, shape, colour),
            "rest": makeup(s_rest, shape, colour),
            "partialled": makeup(s_net, shape, colour),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
out.write_text(json.dumps(rows, indent=2) + "\n")
