"""The counterfactual's table and claim check (`pipeline.evaluation.counterfactual.measure`'s
result -> markdown), `ctrak counterfactual`'s output and docs/counterfactual.md."""

from __future__ import annotations

OTHER = {"shape": "colour", "colour": "shape"}
ORACLE = "labels"  # = pipeline.evaluation.counterfactual.ORACLE (a control, not a competitor)


def _cell(r: dict) -> str:
    return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def baselines(result: dict) -> list[dict]:
    """The no-removal records, one per training seed."""
    return [r for r in result["records"] if r["ranking"] == "none"]


def _base_rate(result: dict, attr: str) -> float | None:
    """The baseline's presence of `attr` at the first seed (the seed every removal uses)."""
    first = [r for r in baselines(result) if r["seed"] == result["seeds"][0]]
    return first[0]["presence"][attr]["rate"] if first else None


def claims(result: dict) -> list[dict]:
    """Per (target, m): whether Concept-TRAK's removal lowered the target's presence more
    than every other ranking's, and the other attribute's less (a drop = baseline - after;
    "separated" = Concept-TRAK's interval lies wholly on the claimed side of every other's).
    Only (target, m) pairs where Concept-TRAK and at least one other ranking are done; the
    label oracle is a control, not compared."""
    out = []
    removals = [r for r in result["records"] if r["ranking"] != "none"]
    for target in result["targets"]:
        for m in sorted({r["m"] for r in removals}):
            rows = [r for r in removals if r["target"] == target and r["m"] == m]
            ours = [r for r in rows if r["ranking"] == "concept-trak"]
            others = [r for r in rows if r["ranking"] not in ("concept-trak", ORACLE)]
            if not ours or not others:
                continue
            attr = ours[0]["attribute"]
            t_ours, o_ours = ours[0]["presence"][attr], ours[0]["presence"][OTHER[attr]]
            t_best = min(others, key=lambda r: r["presence"][attr]["rate"])
            o_worst = min(others, key=lambda r: r["presence"][OTHER[attr]]["rate"])
            t_other = [r["presence"][attr] for r in others]
            o_other = [r["presence"][OTHER[attr]] for r in others]
            out.append(
                {
                    "target": target,
                    "m": m,
                    "target_lowest": all(t_ours["rate"] < p["rate"] for p in t_other),
                    "target_separated": all(t_ours["hi"] < p["lo"] for p in t_other),
                    "target_runner_up": t_best["ranking"],
                    "other_kept_best": all(o_ours["rate"] >= p["rate"] for p in o_other),
                    "other_kept_separated": all(o_ours["lo"] > p["hi"] for p in o_other),
                    "other_lowest_of_others": o_worst["ranking"],
                    "compared_with": sorted(r["ranking"] for r in others),
                }
            )
    return out


def markdown(result: dict) -> str:
    """The table: per target, the baseline rows, then every (ranking, m) with what it removed
    and the presence of the target and of the other attribute after the retrain, each with
    its Wilson 95% interval over the draws; then the claim check."""
    n, draws = result["num_train"], result["draws"]
    lines = [
        f"Prompt {result['prompt']!r} (world {result['world']}, {n} training images); "
        f"presence = share of {draws} draws (CFG {result['guidance']:g}, "
        f"{result['sample_steps']} DDIM steps, draw seed {result['draw_seed']}) whose "
        "attribute the world's classifier reads as the prompt's; [95% Wilson interval over "
        "draws]. Every retrain: the base recipe from scratch, "
        f"{result['train_steps']} steps, seed {result['seeds'][0]}.",
        "",
        "| removal | m | removed (by combination) | shape presence | colour presence |",
        "|---|---|---|---|---|",
    ]
    for r in baselines(result):
        lines.append(
            f"| none (seed {r['seed']}) | 0 | - | {_cell(r['presence']['shape'])} | "
            f"{_cell(r['presence']['colour'])} |"
        )
    base = baselines(result)
    if len(base) > 1:
        spread = {
            a: (
                min(r["presence"][a]["rate"] for r in base),
                max(r["presence"][a]["rate"] for r in base),
            )
            for a in ("shape", "colour")
        }
        lines += [
            "",
            f"Retrain-to-retrain spread without removal ({len(base)} seeds): shape "
            f"{spread['shape'][0]:.2f}-{spread['shape'][1]:.2f}, colour "
            f"{spread['colour'][0]:.2f}-{spread['colour'][1]:.2f}; a drop inside it is "
            "not evidence (the removals all train with seed 0).",
        ]
    for target in result["targets"]:
        rows = [r for r in result["records"] if r["target"] == target]
        if not rows:
            continue
        attr = rows[0]["attribute"]
        base_t, base_o = _base_rate(result, attr), _base_rate(result, OTHER[attr])
        lines += [
            "",
            f"Target {target!r} ({attr}); the other attribute is the {OTHER[attr]}. "
            f"Drop = baseline (seed {result['seeds'][0]}) - after.",
            "",
            f"| ranking | m | removed with {target!r} | removed (by combination) | "
            f"{target!r} presence after | drop | {OTHER[attr]} presence after | drop |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: (-r["m"], r["ranking"] != "concept-trak")):
            t, o = r["presence"][attr], r["presence"][OTHER[attr]]
            combos = ", ".join(f"{k} {v}" for k, v in r["removed_by_combo"].items())
            d_t = "" if base_t is None else f"{base_t - t['rate']:+.2f}"
            d_o = "" if base_o is None else f"{base_o - o['rate']:+.2f}"
            lines.append(
                f"| {r['ranking']} | {r['m']} ({r['m'] / n:.0%}) | {r['removed_with_target']} | "
                f"{combos} | {_cell(t)} | {d_t} | {_cell(o)} | {d_o} |"
            )
    checks = claims(result)
    if checks:
        lines += [
            "",
            "Claim check (Concept-TRAK vs every other ranking at the same target and m):",
            "",
            "| target | m | target lowered most | intervals separated | other kept best | "
            "intervals separated |",
            "|---|---|---|---|---|---|",
        ]
        for c in checks:
            lines.append(
                f"| {c['target']} | {c['m']} | {_yes(c['target_lowest'])} "
                f"(next: {c['target_runner_up']}) | {_yes(c['target_separated'])} | "
                f"{_yes(c['other_kept_best'])} | {_yes(c['other_kept_separated'])} |"
            )
    unique = {r["retrain"]: r for r in result["records"] if not r.get("reused_base")}
    minutes = [r["train_minutes"] for r in unique.values()]
    if minutes:
        lines += [
            "",
            f"{len(result['records'])} rows from {len(minutes)} retrains (rankings that remove "
            "the same images share one; the seed-0 baseline is the base run), "
            f"{min(minutes):.1f}-{max(minutes):.1f} min each "
            f"(mean {sum(minutes) / len(minutes):.1f}).",
        ]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"
