"""The slider check: is a concept's slider eps(c) - eps(c-) a direction of that concept?

Concept-TRAK's query gradient is taken along the slider of the target concept
(docs/method.md (10)-(12): u = eps(x_t, c) - sg[eps(x_t, c-)], c- = the prompt without the
concept). Sampling along it with weight w,

    eps_w = eps(c-) + w (eps(c) - eps(c-)),

draws the negative prompt at w = 0 and the prompt itself at w = 1; if the slider is a direction
of the concept, w > 1 should show the concept at least as often as w = 1 (for the colours of
the toy worlds it does; for their shapes it does not: docs/experiments.md). For every
combination and weight the model draws `per_combo` images (`ctrak.generation.sample` with the
combination's c- as the negative) and a classifier reads whether the target attribute's value
is there; tallied per weight over trained and held-out combinations.

Draw j of combination i uses initial noise i * per_combo + j under `seed` at every weight, as
`ctrak.toy.concept_check.run_check` does, so w = 1 repeats the concept check's draws.
`guide_t = (lo, hi)` follows the slider only at the sampling steps lo <= t <= hi (the prompt
alone elsewhere): whether the slider carries the concept in the noise range that Concept-TRAK's
gradient timesteps cover.
"""

from __future__ import annotations

from collections.abc import Sequence

from ctrak.model import DiffusionModel
from ctrak.toy.concept_check import CheckCombo, Reader

SLIDER_VERSION = "ctrak-slider-check/1"
DEFAULT_WEIGHTS = (0.0, 1.0, 2.0, 4.0)


def run_slider_check(
    model: DiffusionModel,
    attributes: Sequence[str],
    combos: Sequence[CheckCombo],
    read: Reader,
    target: str,
    *,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    per_combo: int = 16,
    steps: int = 25,
    seed: int = 0,
    guide_t: tuple[int, int] | None = None,
) -> dict:
    """Per weight, the draws whose `target` attribute is read as the combination's value
    (module doc): {"weights": [...], "trained": [[ok, n], ...], "heldout": [...], "combos"}."""
    from ctrak.attribution import resolve_negative
    from ctrak.errors import ConfigError
    from ctrak.generation import sample, to_uint8

    if target not in attributes:
        raise ConfigError(f"--slider {target!r} is not an attribute; the attributes: {attributes}")
    j = list(attributes).index(target)
    totals = {"trained": [[0, 0] for _ in weights], "heldout": [[0, 0] for _ in weights]}
    rows = []
    for i, combo in enumerate(combos):
        value = combo.values[j]
        negative = resolve_negative(combo.caption, value, None)  # 1. c-: the prompt minus it
        split = "heldout" if combo.heldout else "trained"
        ok_per_weight = []
        for w_index, w in enumerate(weights):  # 2. draw along the slider at weight w
            x0 = sample(
                model,
                [combo.caption] * per_combo,
                seed=seed,
                first_draw=i * per_combo,
                num_steps=steps,
                guidance=float(w),
                negative=negative,
                guide_t=guide_t,
            )
            images = to_uint8(model.x0_to_images(x0))  # (per_combo, H, W, 3)
            ok = sum(read(image)[j] == value for image in images)  # 3. the target is drawn
            totals[split][w_index][0] += ok
            totals[split][w_index][1] += per_combo
            ok_per_weight.append(ok)
        rows.append(
            {
                "caption": combo.caption,
                "negative": negative,
                "value": value,
                "heldout": combo.heldout,
                "ok": ok_per_weight,
                "n": per_combo,
            }
        )
    return {
        "check": SLIDER_VERSION,
        "model_fingerprint": model.fingerprint,
        "target": target,
        "weights": [float(w) for w in weights],
        "per_combo": per_combo,
        "steps": steps,
        "seed": seed,
        "guide_t": list(guide_t) if guide_t is not None else None,
        **totals,
        "combos": rows,
    }


def slider_table(check: dict) -> str:
    """Markdown: one row per split (and per combination), the draws showing the target at
    each weight, as "ok / n"."""
    weights = check["weights"]
    head = "| " + check["target"] + " slider | " + " | ".join(f"w = {w:g}" for w in weights)
    lines = [head + " |", "|---" * (len(weights) + 1) + "|"]
    for split in ("trained", "heldout"):
        cells = check[split]
        if cells[0][1]:
            lines.append(f"| all {split} | " + " | ".join(f"{k} / {n}" for k, n in cells) + " |")
    for row in check["combos"]:
        label = row["caption"] + (" (held out)" if row["heldout"] else "")
        lines.append(f"| {label} | " + " | ".join(f"{k} / {row['n']}" for k in row["ok"]) + " |")
    return "\n".join(lines)
