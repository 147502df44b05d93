"""`ctrak generate`: sample images from a model under a prompt (DDIM with CFG), as PNGs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample images from a model under a prompt",
        description="Sample images with deterministic DDIM and classifier-free guidance. "
        "Draw i always uses the initial noise derived from (seed, i).",
    )
    parser.add_argument("--model", required=True, help="diffusers model directory")
    parser.add_argument("--prompt", required=True, help='e.g. "a red triangle"')
    parser.add_argument("--num", type=int, default=4, help="number of images (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG weight (default 3)")
    other = parser.add_mutually_exclusive_group()
    other.add_argument(
        "--negative",
        default="",
        help='guide against this prompt instead of the empty one (default "")',
    )
    other.add_argument(
        "--concept",
        help="guide along this concept's slider: against the prompt without it "
        '("a red triangle" with --concept red guides against "a triangle"); with --guidance '
        "above 1 the images show what Concept-TRAK's query direction adds",
    )
    parser.add_argument("--out", default="generated", help="output folder for PNGs")
    parser.add_argument("--json", metavar="PATH", help="write a JSON summary here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from ctrak.attribution import resolve_negative
    from ctrak.errors import ConfigError
    from ctrak.generation import generate_images, to_uint8
    from ctrak.model import DiffusionModel
    from ctrak.tokens import check_query_text

    if args.num < 1:
        raise ConfigError(f"--num {args.num} must be >= 1")
    start = time.perf_counter()
    negative = args.negative
    if args.concept is not None:
        negative = resolve_negative(args.prompt, args.concept, None)
    model = DiffusionModel.load(args.model)
    check_query_text(model, args.prompt, args.concept, negative or "")
    images = generate_images(
        model,
        [args.prompt] * args.num,
        seed=args.seed,
        num_steps=args.steps,
        guidance=args.guidance,
        negative=negative,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, array in enumerate(to_uint8(images)):
        path = out / f"{args.seed:04d}-{i:04d}.png"
        Image.fromarray(array).save(path)
        files.append(str(path))
    seconds = time.perf_counter() - start
    against = f" against {negative!r}" if negative else ""
    print(f"wrote {len(files)} image(s) of {args.prompt!r}{against} to {out}/ in {seconds:.1f}s")
    if args.json:
        summary = {
            "prompt": args.prompt,
            "model": model.fingerprint,
            "seed": args.seed,
            "steps": args.steps,
            "guidance": args.guidance,
            "negative": negative,
            "files": files,
            "seconds": round(seconds, 3),
        }
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0
