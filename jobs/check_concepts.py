"""`ctrak check-concepts`: does the model draw each attribute value it is asked for?

Draws every combination (trained and held out) at the draw guidance, reads each draw with a
classifier (a built-in world's hand-written one, or for `--data --labels` a small CNN trained
on the labelled shards) and writes the per-value rates to MODEL/concept_check.json, which
`ctrak eval` enforces (ctrak.toy.concept_check).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctrak.toy import DEFAULT_MODEL


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "check-concepts",
        help="rate at which the model draws each attribute value right (concept_check.json)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", help="labelled img2dataset shards (with --labels)")
    parser.add_argument(
        "--labels", help="the .json keys that are the attributes, e.g. shape,colour"
    )
    parser.add_argument("--caption-template", help="query prompt, e.g. 'a {colour} {shape}'")
    parser.add_argument("--per-combo", type=int, default=16, help="draws per combination")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG weight of the draws")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/check", help="classifier cache folder")
    parser.add_argument("--out", help="write here (default MODEL/concept_check.json)")
    parser.add_argument(
        "--slider",
        metavar="ATTRIBUTE",
        help="instead: the slider check of this attribute (e.g. shape): per combination, the "
        "draws showing its value when sampling along eps(c-) + w (eps(c) - eps(c-)), c- the "
        "prompt without the value, at each --weights; written to --out only",
    )
    parser.add_argument("--weights", default="0,1,2,4", help="slider weights w (default 0,1,2,4)")
    parser.add_argument(
        "--slider-t",
        metavar="LO:HI",
        help="with --slider: follow the slider only at sampling steps LO <= t <= HI (the "
        "prompt alone elsewhere), e.g. 0:899 for the gradient timesteps' range",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ctrak.model import DiffusionModel
    from ctrak.toy.concept_check import model_inputs, run_check, save_check, summary_line

    if args.slider:  # refuse bad --weights / --slider-t before any work
        weights, guide_t = _weights(args.weights), _t_range(args.slider_t)
    torch.set_num_threads(args.threads)
    model = DiffusionModel.load(args.model)
    attributes, combos, read, described = model_inputs(
        model,
        data=args.data,
        labels=args.labels,
        caption_template=args.caption_template,
        cache=Path(args.work),
    )
    draws = {"per_combo": args.per_combo, "steps": args.steps, "seed": args.seed}
    if args.slider:
        from ctrak.toy.slider_check import run_slider_check, slider_table

        check = run_slider_check(
            model,
            attributes,
            combos,
            read,
            args.slider,
            weights=weights,
            guide_t=guide_t,
            **draws,
        )
        print(slider_table(check))
    else:
        check = run_check(
            model, attributes, combos, read, classifier=described, guidance=args.guidance, **draws
        )
        print(summary_line(check))
    if args.out:
        Path(args.out).write_text(json.dumps(check, indent=2) + "\n")
        print(f"wrote {args.out}")
    elif not args.slider:
        print(f"wrote {save_check(args.model, check)}")
    return 0


def _weights(text: str) -> list[float]:
    from ctrak.errors import ConfigError

    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: give numbers, e.g. 0,1,2,4") from None


def _t_range(text: str | None) -> tuple[int, int] | None:
    from ctrak.errors import ConfigError

    if text is None:
        return None
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--slider-t {text!r}: give LO:HI timesteps, e.g. 0:899") from None
    return lo, hi
