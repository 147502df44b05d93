"""`ctrak counterfactual`: remove each ranking's top-m training images, retrain from scratch,
and measure the target concept's presence in the held-out combination (and the other
attribute's). The library is `pipeline.evaluation.counterfactual` (its module doc says what is
measured); this module parses the arguments and calls it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "counterfactual",
        help="remove each method's top-m training images, retrain, measure concept presence",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--run",
        required=True,
        help="a `ctrak train-toy` output folder trained from scratch: its train_config.json "
        "is the retrain recipe, its model/ ranks the training set",
    )
    parser.add_argument("--prompt", default="a red triangle", help="the held-out combination")
    parser.add_argument("--targets", default="red,triangle", help="target concepts (words)")
    parser.add_argument("--methods", default="concept-trak,trak,d-trak,das")
    parser.add_argument(
        "--no-random", action="store_true", help="leave out the random-removal control"
    )
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="add the label control: remove the images whose label has the target first "
        "(shows whether the world registers a removal at all)",
    )
    parser.add_argument(
        "--cached-only",
        action="store_true",
        help="train nothing: the table of the retrains already in --work",
    )
    parser.add_argument("--sizes", default="100,200", help="numbers of removed images")
    parser.add_argument(
        "--seeds",
        default="0,1",
        help="training seeds of the no-removal baseline; removals retrain with the first "
        "--removal-seeds of them",
    )
    parser.add_argument(
        "--removal-seeds",
        type=int,
        default=1,
        help="how many of --seeds every removal retrains with (drops pooled over them)",
    )
    parser.add_argument(
        "--reuse-base",
        action="store_true",
        help="take the base run's model as the no-removal retrain at its own seed (a retrain "
        "reproduces it bit for bit) instead of training it again",
    )
    parser.add_argument(
        "--min-concept-rate",
        type=float,
        default=0.8,
        help="refuse a target the base model draws right less often on trained combinations "
        "(its concept check, as ctrak eval); 0 turns the check off",
    )
    parser.add_argument("--draws", type=int, default=128, help="draws per presence rate")
    parser.add_argument("--guidance", type=float, default=1.0, help="CFG of draws and ranking")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--rank-draws", type=int, default=16, help="global-scope query draws")
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override every method's attribution setting (as `ctrak eval --set`)",
    )
    parser.add_argument("--work", default="runs/counterfactual", help="cache folder (resumes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--markdown", metavar="PATH", help="write the table (after each retrain)")
    parser.add_argument("--json", metavar="PATH", help="write the result (after each retrain)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pipeline.evaluation.counterfactual_run import Plan, measure
    from pipeline.evaluation.counterfactual_table import markdown
    from pipeline.evaluation.variants import chosen_variants

    torch.set_num_threads(args.threads)
    variants = chosen_variants("methods", args.methods.split(","), args.set)
    plan = Plan(
        run=Path(args.run),
        prompt=args.prompt,
        targets=tuple(args.targets.split(",")),
        variants=tuple(variants),
        sizes=tuple(int(s) for s in args.sizes.split(",")),
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        removal_seeds=args.removal_seeds,
        draws=args.draws,
        guidance=args.guidance,
        sample_steps=args.sample_steps,
        rank_draws=args.rank_draws,
        random=not args.no_random,
        oracle=args.oracle,
        cached_only=args.cached_only,
        reuse_base=args.reuse_base,
        min_concept_rate=args.min_concept_rate,
        work=Path(args.work),
        extra={"overrides": args.set},
    )

    def write(result: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if args.markdown:
            Path(args.markdown).write_text(markdown(result) + "\n")

    result = measure(plan, on_update=write)
    write(result)
    print(markdown(result))
    return 0
