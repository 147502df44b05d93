"""`ctrak train-toy`: train a small text-to-image pixel diffusion model on synthetic shards.

The trainer is `ctrak.toy.train` (its module docstring says what is trained and how); this
module parses the arguments and calls it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ctrak.errors import ConfigError

log = logging.getLogger("ctrak.train_toy")
TEXT_MODES = ("tokens", "frozen", "train")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-toy",
        help="train a small pixel diffusion model on synthetic shards (CPU)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--data", help="folder or URI of the WebDataset shards")
    parser.add_argument("--out", required=True, help="output folder (model/, checkpoints/, ...)")
    parser.add_argument("--world", help="world for sample grids (default: data spec.json)")
    parser.add_argument("--channels", default="16,32,64", help="UNet block_out_channels")
    parser.add_argument("--layers-per-block", type=int, default=1)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=1)
    parser.add_argument(
        "--text-encoder",
        choices=TEXT_MODES,
        default="tokens",
        help="tokens: frozen per-token encoder (see module doc); frozen: random init; train",
    )
    parser.add_argument("--steps", type=int, default=3000, help="also the cosine LR horizon")
    parser.add_argument("--max-minutes", type=float, default=float("inf"), help="wall-clock stop")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--prompt-dropout", type=float, default=0.1)
    parser.add_argument(
        "--attribute-dropout",
        type=float,
        default=0.0,
        help="probability of dropping one attribute word from a caption ('a red triangle' -> "
        "'a triangle' or 'a red'), so concept-slider negatives are trained conditions",
    )
    parser.add_argument(
        "--init", metavar="MODEL_DIR", help="fine-tune: start from this model's weights"
    )
    parser.add_argument(
        "--prediction",
        choices=("v_prediction", "epsilon"),
        default="v_prediction",
        help="network target written to the scheduler config. epsilon fails to sample with "
        "squaredcos_cap_v2: abar(999) ~ 2e-9, so x0_hat = (x_t - sqrt(1-abar) eps)/sqrt(abar) "
        "amplifies eps errors ~2e4-fold at the first DDIM step (see module doc)",
    )
    parser.add_argument("--min-snr-gamma", type=float, default=0.0, help="0 = plain DDPM loss")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-minutes", type=float, default=5.0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads; use 1 when other processes share the cores (docs/experiments.md)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    parser.add_argument("--eval-per-combo", type=int, default=8, help="samples per combo")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="CFG weight for sample grids (toy-paper composes its held-out combination at 1)",
    )
    parser.add_argument(
        "--labels",
        help="labelled set: the .json keys that are the attributes (e.g. shape,colour); the "
        "final concept check then uses a small classifier trained on the shards",
    )
    parser.add_argument(
        "--caption-template",
        help="with --labels: the query prompt of a combination, e.g. 'a {colour} {shape}' "
        "(default: read from the captions)",
    )
    parser.add_argument(
        "--vocabulary",
        choices=("captions", "builtin", "builtin+captions"),
        default="captions",
        help="tokenizer words: those of the training captions; the fixed DEFAULT_WORDS the "
        "shipped toy models were trained with; or those followed by the caption words they "
        "lack (recorded in model/tokenizer/vocabulary.json)",
    )
    parser.add_argument(
        "--check-per-combo",
        type=int,
        default=16,
        help="draws per combination of the final concept check (0: no check)",
    )
    parser.add_argument("--grid", help="also copy the final sample grid here (PNG)")
    parser.add_argument(
        "--grid-only", metavar="MODEL_DIR", help="no training: draw the grid of MODEL_DIR to --out"
    )
    parser.add_argument("--json", help="write the summary here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ctrak.toy.samples import sample_grid, score_line
    from ctrak.toy.train import train

    if args.grid_only:
        if not args.world:
            raise ConfigError("--grid-only needs --world (paper or wide)")
        torch.set_num_threads(args.threads)
        summary = {
            "model": args.grid_only,
            "grid": args.out,
            "samples": sample_grid(
                args.grid_only,
                args.world,
                args.out,
                per_combo=args.eval_per_combo,
                steps=args.sample_steps,
                guidance=args.guidance,
                seed=args.seed,
            ),
        }
        log.info("%s", score_line(summary["samples"]))
    else:
        if not args.data:
            raise ConfigError("train-toy needs --data (a folder of shards from generate_world)")
        summary = train(args)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0
