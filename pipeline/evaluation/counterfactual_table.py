"""The counterfactual's table and claim check (`pipeline.evaluation.counterfactual.measure`'s
result -> markdown), `ctrak counterfactual`'s output and docs/counterfactual.md."""

from __future__ import annotations

import math

from ctrak.errors import ConfigError

OTHER = {"shape": "colour", "colour": "shape"}
ORACLE = "labels"  # = pipeline.evaluation.counterfactual.ORACLE (a control, not a competitor)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k / n (Wilson 1927)."""
    if n <= 0 or not 0 <= k <= n:
        raise ConfigError(f"wilson: need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    # 1. centre and half-width of the score interval
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict:
    """{"k", "n", "rate", "lo", "hi"}: a rate with its Wilson 95% interval."""
    lo, hi = wilson(k, n)
    return {"k": int(k), "n": int(n), "rate": k / n, "lo": lo, "hi": hi}


def pooled(records: list[dict], attr: str) -> dict:
    """The presence of `attr` over the draws of several retrains (one per training seed)."""
    return rate(
        sum(r["presence"][attr]["k"] for r in records),
        sum(r["presence"][attr]["n"] for r in records),
    )


def _cell(r: dict) -> str:
    return f"{r['rate']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"


def _pooled_cell(group: list[dict], attr: str) -> str:
    """The pooled rate with its interval, then each seed's rate when there are several."""
    cell = _cell(pooled(group, attr))
    if len(group) > 1:
        cell += (
            " (" + ", ".join(f"s{r['seed']} {r['presence'][attr]['rate']:.2f}" for r in group) + ")"
        )
    return cell


def removal_seeds(result: dict) -> list[int]:
    """The training seeds the removals retrained with (the first --removal-seeds of seeds)."""
    return result["seeds"][: result.get("removal_seeds", 1)]


def baselines(result: dict) -> list[dict]:
    """The no-removal records, one per training seed."""
    return [r for r in result["records"] if r["ranking"] == "none"]


def _base_rate(result: dict, attr: str, seeds: set[int]) -> float | None:
    """The baselines' presence of `attr` pooled over `seeds` (the seeds a removal retrained
    with), or None until every one of them is done."""
    rows = [r for r in baselines(result) if r["seed"] in seeds]
    return pooled(rows, attr)["rate"] if len(rows) == len(seeds) else None


def removal_groups(result: dict) -> list[list[dict]]:
    """The removal records grouped by (ranking, target, m): one record per training seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in result["records"]:
        if r["ranking"] != "none":
            groups.setdefault((r["ranking"], r["target"], r["m"]), []).append(r)
    return list(groups.values())


def claims(result: dict) -> list[dict]:
    """Per (target, m): whether Concept-TRAK's removal lowered the target's presence more
    than every other ranking's, and the other attribute's less (a drop = baseline - after;
    "separated" = Concept-TRAK's interval lies wholly on the claimed side of every other's).
    Presence pooled over the training seeds each removal retrained with, compared only
    between rankings retrained with the same seeds. Only (target, m) pairs where
    Concept-TRAK and at least one other ranking are done; the label oracle is a control, not
    compared."""
    out = []
    groups = removal_groups(result)
    for target in result["targets"]:
        for m in sorted({g[0]["m"] for g in groups}):
            rows = [g for g in groups if g[0]["target"] == target and g[0]["m"] == m]
            ours = [g for g in rows if g[0]["ranking"] == "concept-trak"]
            if not ours:
                continue
            seeds = {r["seed"] for r in ours[0]}
            others = [
                g
                for g in rows
                if g[0]["ranking"] not in ("concept-trak", ORACLE)
                and {r["seed"] for r in g} == seeds
            ]
            if not others:
                continue
            attr = ours[0][0]["attribute"]
            t_ours, o_ours = pooled(ours[0], attr), pooled(ours[0], OTHER[attr])
            t_other = {g[0]["ranking"]: pooled(g, attr) for g in others}
            o_other = {g[0]["ranking"]: pooled(g, OTHER[attr]) for g in others}
            out.append(
                {
                    "target": target,
                    "m": m,
                    "seeds": sorted(seeds),
                    "target_lowest": all(t_ours["rate"] < p["rate"] for p in t_other.values()),
                    "target_separated": all(t_ours["hi"] < p["lo"] for p in t_other.values()),
                    "target_runner_up": min(t_other, key=lambda k: t_other[k]["rate"]),
                    "other_kept_best": all(o_ours["rate"] >= p["rate"] for p in o_other.values()),
                    "other_kept_separated": all(o_ours["lo"] > p["hi"] for p in o_other.values()),
                    "other_lowest_of_others": min(o_other, key=lambda k: o_other[k]["rate"]),
                    "compared_with": sorted(t_other),
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
        "draws, pooled over a removal's training seeds]. Every retrain: the base recipe from "
        f"scratch, {result['train_steps']} steps; removals with seeds "
        f"{', '.join(map(str, removal_seeds(result)))}.",
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
            "not evidence unless it holds at every seed.",
        ]
    groups = removal_groups(result)
    for target in result["targets"]:
        rows = [g for g in groups if g[0]["target"] == target]
        if not rows:
            continue
        attr = rows[0][0]["attribute"]
        lines += [
            "",
            f"Target {target!r} ({attr}); the other attribute is the {OTHER[attr]}. "
            "Drop = baseline - after, both pooled over the removal's seeds (paired).",
            "",
            f"| ranking | m | removed with {target!r} | removed (by combination) | "
            f"{target!r} presence after | drop | {OTHER[attr]} presence after | drop |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for g in sorted(rows, key=lambda g: (-g[0]["m"], g[0]["ranking"] != "concept-trak")):
            r, seeds = g[0], {x["seed"] for x in g}
            base_t, base_o = _base_rate(result, attr, seeds), _base_rate(result, OTHER[attr], seeds)
            combos = ", ".join(f"{k} {v}" for k, v in r["removed_by_combo"].items())
            d_t = "" if base_t is None else f"{base_t - pooled(g, attr)['rate']:+.2f}"
            d_o = "" if base_o is None else f"{base_o - pooled(g, OTHER[attr])['rate']:+.2f}"
            lines.append(
                f"| {r['ranking']} | {r['m']} ({r['m'] / n:.0%}) | {r['removed_with_target']} | "
                f"{combos} | {_pooled_cell(g, attr)} | {d_t} | {_pooled_cell(g, OTHER[attr])} "
                f"| {d_o} |"
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
