"""Local dev P@10 of Concept-TRAK with the concept tokens (T) carried on into the attention
output: the query's gradient of each attn2 `to_out` sums only the part of its input that the
concept's tokens contribute (sum over the concept's positions j of a_{s,j} v_j, a the
attention weights, v the values), as T does for `to_k` / `to_v`. A prototype patched in here,
not an option of ctrak; the training features are the defaults'.

    python docs/icons-scripts/query_out_tokens.py WORLD WORK PER_COMBO OUT.json [MODES]

MODES (optional, comma-separated): only the variants of these modes (none, out, out-noq,
out+q; "none" = defaults and T). A sixth argument "global": global scope instead (one query
per combination and target, 32 draws from seed 5000 at CFG 1, as the dev runs of
docs/defaults-tokens.md; toy-wide on its held-out combinations only).

Variants: defaults, T, T + to_out's concept part, that with the query's `to_q` dropped, and
that with `to_q`'s output-gradient kept to the concept's share too (the part of dL/dq that
flows through the concept tokens' attention scores: dL/dq_s = scale sum_j dL/ds_{s,j} k_j,
j over the concept's positions). Every recomputed attention output and dL/dq (all tokens) is
checked against the one the layer saw."""

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
STATE = {"mode": None, "mask": None, "checked": 0, "worst": 0.0}
SEEN: dict[str, list[dict[str, torch.Tensor]]] = {}  # attn2 module -> recent forwards' q, k, v
_project = factored.layer_projection
_grad = torch.autograd.grad
OUTS: dict[int, dict[str, torch.Tensor]] = {}  # id(to_out output) -> its forward's record


def grad_and_keep(outputs, inputs, *args, **kwargs):
    grads = _grad(outputs, inputs, *args, **kwargs)
    for x, g in zip(inputs, grads, strict=True):
        run = OUTS.get(id(x))
        if run is not None and g is not None and run.get("out") is x:
            run["g_out"] = g.detach()
    return grads


def record(attn_name: str, part: str):
    def fn(module, args, output):
        runs = SEEN.setdefault(attn_name, [])
        if not runs or part in runs[-1]:
            runs.append({})
            del runs[:-4]
        if part == "out":
            runs[-1]["out"] = output
            OUTS[id(output)] = runs[-1]
        else:
            runs[-1][part] = output.detach()

    return fn


def concept_part(attn, runs, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The concept tokens' share of the attention output `a` (B, S, inner)."""
    h = attn.heads
    for run in reversed(runs):
        q, k, v = run["q"], run["k"], run["v"]
        if q.shape[0] != a.shape[0]:
            continue
        B, S, inner = q.shape
        qh, kh, vh = (x.reshape(B, -1, h, inner // h).transpose(1, 2) for x in (q, k, v))
        w = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1)  # (B, h, S, L)
        full = (w @ vh).transpose(1, 2).reshape(B, S, inner)
        err = float((full - a).abs().max() / a.abs().max())
        if err < 1e-4:
            STATE["checked"] += 1
            STATE["worst"] = max(STATE["worst"], err)
            part = (w * mask.to(w)[None, None, None, :]) @ vh
            return part.transpose(1, 2).reshape(B, S, inner)
    raise RuntimeError("no recorded forward reproduces the attention output")


def concept_dq(attn, runs, a: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor):
    """The part of dL/dq (`delta`, B x S x inner) through the concept tokens' scores."""
    h = attn.heads
    q_seen = torch.nn.functional.linear(a, attn.to_q.weight, attn.to_q.bias)
    for run in reversed(runs):
        if "g_out" not in run or run["q"].shape != q_seen.shape:
            continue
        if float((run["q"] - q_seen).abs().max()) > 1e-5 * float(q_seen.abs().max()):
            continue
        q, k, v = run["q"], run["k"], run["v"]
        B, S, inner = q.shape
        g = run["g_out"] @ attn.to_out[0].weight  # dL/d(attention output)
        qh, kh, vh, gh = (x.reshape(B, -1, h, inner // h).transpose(1, 2) for x in (q, k, v, g))
        w = torch.softmax(qh @ kh.transpose(-1, -2) * attn.scale, dim=-1)  # (B, h, S, L)
        gv = gh @ vh.transpose(-1, -2)
        ds = w * (gv - (w * gv).sum(-1, keepdim=True))  # dL/d(scores)
        full = (ds @ kh * attn.scale).transpose(1, 2).reshape(B, S, inner)
        err = float((full - delta).abs().max() / delta.abs().max())
        if err < 1e-4:
            STATE["checked"] += 1
            STATE["worst"] = max(STATE["worst"], err)
            part = (ds * mask.to(ds)[None, None, None, :]) @ kh * attn.scale
            return part.transpose(1, 2).reshape(B, S, inner)
    raise RuntimeError("no recorded forward reproduces dL/dq")


def patched(layer, factors, a, delta):
    mode = STATE["mode"]
    if mode and layer.name.endswith("attn2.to_q") and mode == "out-noq":
        proj, sq = _project(layer, factors, a, delta)
        return torch.zeros_like(proj), torch.zeros_like(sq)
    if mode == "out+q" and layer.name.endswith("attn2.to_q"):
        attn_name = layer.name.removesuffix(".to_q")
        delta = concept_dq(MODULES[attn_name], SEEN[attn_name], a, delta, STATE["mask"])
    if mode and layer.name.endswith("attn2.to_out.0"):
        attn_name = layer.name.removesuffix(".to_out.0")
        a = concept_part(MODULES[attn_name], SEEN[attn_name], a, STATE["mask"])
    return _project(layer, factors, a, delta)


factored.layer_projection = patched
torch.autograd.grad = grad_and_keep
model = DiffusionModel.load(MODEL)
MODULES = {n: m for n, m in model.unet.named_modules() if n.endswith("attn2")}
for name, attn in MODULES.items():
    parts = (("q", attn.to_q), ("k", attn.to_k), ("v", attn.to_v), ("out", attn.to_out[0]))
    for part, lin in parts:
        lin.register_forward_hook(record(name, part))
spec = json.loads((MODEL / "data_spec.json").read_text())
bench = world_bench(spec["world"], lambda: training_set(MODEL, work, None))
images, captions, labels = bench.load_rows()
att = Attributor(model, AttributionConfig())
features, _ = _features(att, images, captions, work / "cache")
kernel = att.fit(features)
scope = sys.argv[6] if len(sys.argv) > 6 else "local"
combos = [c for c in bench.combos if scope == "local" or world != "wide" or c.heldout]
queries = query_images(model, bench, per_combo, seed=5000) if scope == "local" else {}
T = replace(att.config.query, concept_tokens=True)
variants = {
    "defaults": (att.config.query, None),
    "concept tokens": (T, None),
    "concept tokens + to_out's concept part": (T, "out"),
    "concept tokens + to_out's concept part, no to_q": (T, "out-noq"),
    "concept tokens + the concept's part of to_out and to_q": (T, "out+q"),
}
if len(sys.argv) > 5:
    keep = sys.argv[5].split(",")
    variants = {k: v for k, v in variants.items() if (v[1] or "none") in keep}
records = []
for name, (cfg, mode) in variants.items():
    for combo in combos:
        for attr, value in zip(bench.attributes, combo.values, strict=True):
            STATE["mode"] = mode
            STATE["mask"] = model.concept_token_mask(combo.caption, value)
            if scope == "local":
                imgs = queries[combo.caption]["images"]
                batch = [(Query(combo.caption, value, image=i[None]), cfg) for i in imgs]
            else:
                draws = replace(cfg, scope="global", num_draws=32, sample_guidance=1.0, seed=5000)
                batch = [(Query(combo.caption, value), draws)]
            g = torch.stack([att.query_gradient(q, c) for q, c in batch])
            STATE["mode"] = None
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
    mine = [r for r in records if r["variant"] == name]
    cell = {
        split: float(np.mean([v for r in mine if r["heldout"] == h for v in r["per_query"]]))
        for split, h in (("ID", False), ("OOD", True))
        if any(r["heldout"] == h for r in mine)
    }
    held = {f"{r['prompt']} / {r['target']}": r["precision"] for r in mine if r["heldout"]}
    check = {"outputs checked": STATE["checked"], "worst rel. error": STATE["worst"]}
    print(json.dumps({"variant": name, **cell, "held out": held, **check}), flush=True)
result = {"world": world, "scope": scope, "per_combo": per_combo, "records": records}
out.write_text(json.dumps(result) + "\n")
