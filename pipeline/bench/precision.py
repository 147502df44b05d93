"""bfloat16 vs float32 features on CPU: how far the model dtype moves what is stored and
what a query ranks.

The same training images and query images go through the same configuration twice, the
model loaded in float32 and in bfloat16 (the DPS direction, norms, projections and the Gram
stay float32/float64 in both). Reported: the cosine of each training row's two features
(min / median / mean), and per query the overlap of the two top-10 sets (each query's scores
from its own dtype's features, kernel and query gradient).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig
from ctrak.model import DiffusionModel


def measure_bf16_agreement(
    model_dir: str | Path,
    work: str | Path,
    num_train: int,
    per_combo: int,
    query_seed: int,
    config: AttributionConfig | None = None,
) -> dict[str, object]:
    """-> {"cosine": {min, median, mean}, "top10_overlap": {mean, min, per_query}, counts}."""
    from ctrak.toy.worlds import world_combos
    from pipeline.evaluation.synthetic_bench import query_images, training_set

    model_dir, config = Path(model_dir), config or AttributionConfig()
    world = json.loads((model_dir / "data_spec.json").read_text())["world"]
    images, captions, _ = training_set(model_dir, Path(work), num_train)
    fp32 = DiffusionModel.load(model_dir)
    queries = query_images(fp32, world, per_combo, seed=query_seed, guidance=1.0)
    batch = []
    for combo in world_combos(world):
        q = queries.get(combo.caption)
        if q is None or q["images"] is None:
            continue
        for value in (combo.shape, combo.colour):
            batch += [Query(combo.caption, concept=value, image=img[None]) for img in q["images"]]
    out: dict[str, dict] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = fp32 if dtype == torch.float32 else DiffusionModel.load(model_dir, dtype=dtype)
        attributor = Attributor(model, config)
        features = attributor.featurize(images, captions, batch_size=16)
        kernel = attributor.fit(features)
        out[name] = {
            "features": features,
            "top": attributor.attribute(batch, features, kernel, top_k=10).indices,
        }
    # 1. per training row: cosine of its two features
    cosine = torch.nn.functional.cosine_similarity(
        out["bfloat16"]["features"].double(), out["float32"]["features"].double(), dim=1
    ).tolist()
    # 2. per query: |top-10(bf16) & top-10(fp32)| / 10
    overlap = [
        len(set(a) & set(b)) / 10
        for a, b in zip(
            out["bfloat16"]["top"].tolist(), out["float32"]["top"].tolist(), strict=True
        )
    ]
    return {
        "model": str(model_dir),
        "num_train": len(captions),
        "queries": len(batch),
        "query_seed": query_seed,
        "config": config.provenance(),
        "cosine": {
            "min": min(cosine),
            "median": statistics.median(cosine),
            "mean": statistics.fmean(cosine),
        },
        "top10_overlap": {"mean": statistics.fmean(overlap), "min": min(overlap)},
        "per_query_overlap": overlap,
    }
