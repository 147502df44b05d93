"""Samples of a toy model, classified: every combination of its world drawn with
`ctrak.generation` (DDIM + classifier-free guidance), scored by the world's classifier, and a
PNG grid of them (the trainer's checkpoints, `ctrak train-toy --grid-only`, TRAINING.md)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ctrak.model import DiffusionModel


def evaluate_samples(
    model: DiffusionModel,
    world: str,
    *,
    per_combo: int = 8,
    steps: int = 25,
    guidance: float = 1.0,
    seed: int = 0,
) -> tuple[dict[str, dict], np.ndarray]:
    """Draw `per_combo` images of every combination and classify them.

    Returns ({caption: {"correct", "n", "heldout", "shape_ok", "colour_ok"}},
    images (n_combos, per_combo, H, W, 3) uint8).
    """
    from ctrak.toy.worlds import classify, world_combos

    combos = world_combos(world)
    prompts = [c.caption for c in combos for _ in range(per_combo)]
    from ctrak.generation import generate_images, to_uint8

    drawn = generate_images(model, prompts, seed=seed, num_steps=steps, guidance=guidance)
    images = to_uint8(drawn)
    images = images.reshape(len(combos), per_combo, *images.shape[1:])
    result = {}
    for combo, row in zip(combos, images, strict=True):
        labels = [classify(image, world) for image in row]
        result[combo.caption] = {
            "heldout": combo.heldout,
            "n": per_combo,
            "correct": sum(lab == (combo.shape, combo.colour) for lab in labels),
            "shape_ok": sum(lab[0] == combo.shape for lab in labels),
            "colour_ok": sum(lab[1] == combo.colour for lab in labels),
        }
    return result, images


def draw_grid(world: str, result: dict[str, dict], images: np.ndarray, path: str | Path) -> Path:
    """A PNG grid: one row per combination (4x upscaled), caption and score on the left,
    held-out rows marked, each image framed green (classified correct) or red."""
    from PIL import Image, ImageDraw

    from ctrak.toy.worlds import classify, world_combos

    combos = world_combos(world)
    n_rows, n_cols, size = images.shape[0], images.shape[1], images.shape[2]
    cell, pad, label_w = size * 4, 4, 190
    canvas = Image.new(
        "RGB", (label_w + n_cols * (cell + pad) + pad, n_rows * (cell + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, combo in enumerate(combos):
        y = pad + r * (cell + pad)
        score = result[combo.caption]
        text = f"{combo.caption}\n{'HELD-OUT' if combo.heldout else 'train'}"
        text += f"\n{score['correct']}/{score['n']} correct"
        draw.multiline_text((6, y + 8), text, fill="red" if combo.heldout else "black")
        for c in range(n_cols):
            x = label_w + pad + c * (cell + pad)
            ok = classify(images[r, c], world) == (combo.shape, combo.colour)
            draw.rectangle(
                (x - 2, y - 2, x + cell + 1, y + cell + 1), outline="green" if ok else "red"
            )
            tile = Image.fromarray(images[r, c]).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path


def sample_grid(
    model_dir: str | Path,
    world: str,
    out_png: str | Path,
    *,
    per_combo: int = 8,
    steps: int = 25,
    guidance: float = 1.0,
    seed: int = 0,
) -> dict[str, dict]:
    """Load a model, draw every combination of `world` and save the grid; return the scores."""
    model = DiffusionModel.load(model_dir)
    result, images = evaluate_samples(
        model, world, per_combo=per_combo, steps=steps, guidance=guidance, seed=seed
    )
    draw_grid(world, result, images, out_png)
    return result


def score_line(result: dict) -> str:
    """{caption: score} -> "a red circle 8/8, a red triangle* 3/8, ..." (* = held out)."""
    return ", ".join(
        f"{cap}{'*' if s['heldout'] else ''} {s['correct']}/{s['n']}" for cap, s in result.items()
    )
