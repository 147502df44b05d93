"""`ctrak train-toy`: train a small text-to-image pixel diffusion model on synthetic shards.

The model is `ctrak.toy.tiny.build_tiny_model`'s layout (UNet2DConditionModel + CLIPTextModel +
word-level tokenizer + DDPM scheduler, no VAE), trained from scratch with the DDPM loss
E_{t, eps} || target - f_theta(x_t, t, c) ||^2, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
(Ho et al. 2020, eq. 14), the caption replaced by the empty prompt with probability
`prompt_dropout` (the null condition of classifier-free guidance).

Target: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 by default (Salimans & Ho 2022), written
into the scheduler config so `DiffusionModel.eps` converts it back to eps. With the pixel
schedule squaredcos_cap_v2, abar_999 ~ 2e-9: an eps-network must output x_t to ~1e-4 there,
else x0_hat = (x_t - sqrt(1 - abar) eps) / sqrt(abar) is garbage that the first DDIM step
bakes in (measured: an eps model at loss 0.027 sampled saturated colour noise). v keeps
x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v well conditioned at every t (Lin et al. 2024).
`--prediction epsilon` trains the plain eps target. Text encoder modes:

- `tokens` (default): the encoder's attention and MLP branches are zeroed and it is frozen,
  so it maps each token to LayerNorm(token embedding + position embedding) and never mixes
  "red" into "triangle" - the separable prompt that lets the UNet compose held-out pairs;
- `frozen`: the random-init encoder, frozen; `train`: trained with the UNet.

Output folder: `model/` (the latest EMA weights, a diffusers directory that
`ctrak.model.DiffusionModel.load` reads), `checkpoints/step-NNNNNN/` (every few minutes),
`train_log.jsonl`, `train_config.json` and `state.pt` (to resume). `evaluate_samples` draws and
classifies images with `ctrak.generation` (DDIM + classifier-free guidance) and `sample_grid`
a PNG grid of every combination of a world.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ctrak.model import DiffusionModel
from ctrak.seeds import derive_seed, generator

log = logging.getLogger("ctrak.train_toy")


# ---- data ----------------------------------------------------------------------------------
def load_shards(
    uri: str, storage_options: dict | None = None
) -> tuple[torch.Tensor, list[str], list[str], dict | None]:
    """All samples under `uri` -> (images (N, 3, H, W) in [-1, 1], captions, keys, spec)."""
    import fsspec

    from ctrak.toy.worlds import read_samples

    rows = list(read_samples(uri, storage_options))
    images = np.stack([row["image"] for row in rows])  # (N, H, W, 3) uint8
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    spec_path = f"{root.rstrip('/')}/spec.json"
    spec = json.loads(fs.cat_file(spec_path)) if fs.exists(spec_path) else None
    return x0, [row["caption"] for row in rows], [row["key"] for row in rows], spec


# ---- model ---------------------------------------------------------------------------------
def make_separable(text_encoder: torch.nn.Module) -> None:
    """Zero every layer's attention output and MLP output projections: the encoder becomes
    h_l = LayerNorm(E[token_l] + P[l]) per position (residual branches contribute zero)."""
    with torch.no_grad():
        core = getattr(text_encoder, "text_model", text_encoder)  # transformers < 5 nests it
        for layer in core.encoder.layers:
            for proj in (layer.self_attn.out_proj, layer.mlp.fc2):
                proj.weight.zero_()
                proj.bias.zero_()


def save_model(base: Path, unet, text_encoder, out: Path) -> Path:
    """Write a diffusers directory at `out` (atomically: temp folder, then rename) holding
    `unet` and `text_encoder` and the tokenizer/scheduler/index of `base`."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(base / name, tmp / name)
    shutil.copy(base / "model_index.json", tmp / "model_index.json")
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def lr_at(step: int, *, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to lr / 10 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _attribute_drops(caption: str) -> list[str]:
    """ "a red triangle" -> ["a triangle", "a red"]: the caption without each attribute word,
    spelled exactly as `ctrak.attribution.resolve_negative` spells a query's c-."""
    from ctrak.attribution import resolve_negative

    words = caption.split()
    if len(words) != 3:
        return []
    return [resolve_negative(caption, word, None) for word in words[1:]]


def _drop_attributes(texts: list[str], p: float, seed: int, step: int) -> list[str]:
    """Replace each caption, with probability p, by itself minus one attribute word (chosen
    uniformly), so the concept slider's c- ("a red", "a triangle") is a condition the model
    was trained on, as the per-attribute null label of the paper's class-conditional model."""
    gen = generator(seed, "train-toy-attribute-dropout", step)
    drop = torch.rand(len(texts), generator=gen) < p
    which = torch.randint(0, 2, (len(texts),), generator=gen)
    out = []
    for text, d, w in zip(texts, drop.tolist(), which.tolist(), strict=True):
        options = _attribute_drops(text)
        out.append(options[w] if d and options else text)
    return out


# ---- sampling (ctrak.generation) ----------------------------------------------------------
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


# ---- training ------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict:
    """The training loop; returns the summary written to --json."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ctrak.toy.tiny import build_tiny_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. data into memory
    x0_all, captions, keys, spec = load_shards(args.data)
    n, _, height, _ = x0_all.shape
    world = args.world or (spec or {}).get("world")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config.update(data_spec=spec, num_train_images=n, image_size=height, world=world)
    (out / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # 2. model from the tiny builder, then its components as trainable modules
    base = out / "base"
    channels = tuple(int(c) for c in args.channels.split(","))
    if args.init and not (base / "model_index.json").exists():
        # fine-tuning: the init model's components (weights included) are the starting point
        tmp = base.with_name("base.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(args.init, tmp, ignore=shutil.ignore_patterns("*.md", "*.json.bak"))
        tmp.rename(base)
    if not (base / "model_index.json").exists():
        build_tiny_model(
            base,
            image_size=height,
            block_out_channels=channels,
            layers_per_block=args.layers_per_block,
            text_dim=args.text_dim,
            text_layers=args.text_layers,
            seed=derive_seed(args.seed, "train-toy-init"),
        )
        sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        sched = DDPMScheduler.from_config(sched.config, prediction_type=args.prediction)
        sched.save_pretrained(base / "scheduler")
    unet = UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True)
    if args.text_encoder == "tokens":
        make_separable(text_encoder)
    tokenizer = DiffusionModel.load(base).tokenizer
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    abar = scheduler.alphas_cumprod.float()  # (T,)
    train_text = args.text_encoder == "train"
    text_encoder.requires_grad_(train_text)
    modules = [unet, text_encoder] if train_text else [unet]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    ema = [p.detach().clone() for p in params]

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        return text_encoder(ids)[0]  # (B, L, D)

    # 3. resume
    step, elapsed, history = 0, 0.0, []
    state_path = out / "state.pt"
    if args.resume and state_path.exists():
        state = torch.load(state_path, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        for e, v in zip(ema, state["ema"], strict=True):
            e.copy_(v)
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        log.info("resumed at step %d (%.0f s)", step, elapsed)

    def checkpoint(tag: str) -> Path:
        ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text_encoder)
        ema_modules = [ema_unet, ema_text] if train_text else [ema_unet]
        ema_params = [p for m in ema_modules for p in m.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, e in zip(ema_params, ema, strict=True):
                p.copy_(e)
        path = save_model(base, ema_unet, ema_text, out / "checkpoints" / tag)
        save_model(base, ema_unet, ema_text, out / "model")
        state = {
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "opt": opt.state_dict(),
            "ema": ema,
            "step": step,
            "elapsed": elapsed,
            "history": history,
        }
        torch.save(state, state_path.with_suffix(".tmp"))
        os.replace(state_path.with_suffix(".tmp"), state_path)
        return path

    def evaluate(path: Path) -> dict | None:
        if args.eval_per_combo <= 0 or not world:
            return None
        t0 = time.time()
        result, images = evaluate_samples(
            DiffusionModel.load(path),
            world,
            per_combo=args.eval_per_combo,
            steps=args.sample_steps,
            guidance=args.guidance,
            seed=args.seed,
        )
        draw_grid(world, result, images, path / "samples.png")
        log.info("eval %s (%.0f s): %s", path.name, time.time() - t0, score_line(result))
        return result

    # 4. the loop
    cond_cache = {} if not train_text else None
    if cond_cache is not None:
        with torch.no_grad():
            for text in {*captions, *(a for c in captions for a in _attribute_drops(c)), ""}:
                cond_cache[text] = encode([text])[0]
    batch_gen = generator(args.seed, "train-toy-batches")
    order, cursor = torch.randperm(n, generator=batch_gen), 0
    for _ in range(step):  # replay the batch stream on resume
        cursor += args.batch_size
        if cursor > n:
            order, cursor = torch.randperm(n, generator=batch_gen), args.batch_size
        torch.rand(args.batch_size, generator=batch_gen)
    noise_gen = generator(args.seed, "train-toy-noise", step)
    log_path = out / "train_log.jsonl"
    last_ckpt, loss_avg, start = elapsed, None, time.time() - elapsed
    unet.train()
    while step < args.steps and elapsed < args.max_minutes * 60:
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=batch_gen), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        drop = torch.rand(len(idx), generator=batch_gen) < args.prompt_dropout
        texts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]
        if args.attribute_dropout > 0:  # own stream: runs without it keep their batches
            texts = _drop_attributes(texts, args.attribute_dropout, args.seed, step)
        x0 = x0_all[idx]  # (B, 3, H, W)
        # 1. forward noising at uniform t: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
        t = torch.randint(0, len(abar), (len(idx),), generator=noise_gen)
        eps = torch.randn(x0.shape, generator=noise_gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        # 2. condition and prediction
        if cond_cache is not None:
            cond = torch.stack([cond_cache[s] for s in texts])
        else:
            cond = encode(texts)
        pred = unet(x_t, t, encoder_hidden_states=cond).sample
        # 3. DDPM loss on the eps (or v) target, optionally min-SNR-gamma weighted
        if scheduler.config.prediction_type == "v_prediction":
            target = a.sqrt() * eps - (1 - a).sqrt() * x0  # v = sqrt(abar) eps - sqrt(1-abar) x0
        else:
            target = eps
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))  # (B,)
        if args.min_snr_gamma > 0:
            snr = abar[t] / (1 - abar[t])
            v_pred = scheduler.config.prediction_type == "v_prediction"
            per_sample = per_sample * snr.clamp(max=args.min_snr_gamma) / (snr + v_pred)
        loss = per_sample.mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=args.lr, warmup=args.warmup, total=args.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # 4. EMA of the trained weights (decay ramps up early)
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        step += 1
        elapsed = time.time() - start
        loss_value = loss.item()
        loss_avg = loss_value if loss_avg is None else 0.98 * loss_avg + 0.02 * loss_value
        if step % args.log_every == 0 or step == 1:
            record = {
                "step": step,
                "loss": round(loss_value, 5),
                "loss_avg": round(loss_avg, 5),
                "lr": opt.param_groups[0]["lr"],
                "elapsed_s": round(elapsed, 1),
                "s_per_step": round(elapsed / step, 3),
            }
            with log_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            history.append(record)
            log.info(
                "step %d loss %.4f (avg %.4f) %.2f s/step",
                step,
                loss_value,
                loss_avg,
                elapsed / step,
            )
        if elapsed - last_ckpt >= args.ckpt_minutes * 60:
            result = evaluate(checkpoint(f"step-{step:06d}"))
            _log_eval(log_path, step, elapsed, result)
            last_ckpt = elapsed = time.time() - start
    final = checkpoint(f"step-{step:06d}")
    result = evaluate(final)
    _log_eval(log_path, step, elapsed, result)
    if args.grid and result is not None:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(final / "samples.png", args.grid)
    losses = [r["loss_avg"] for r in history]
    return {
        "model": str(out / "model"),
        "checkpoint": str(final),
        "world": world,
        "data_spec": spec,
        "num_train_images": n,
        "image_size": height,
        "unet_params": n_params,
        "text_encoder": args.text_encoder,
        "steps": step,
        "batch_size": args.batch_size,
        "wall_s": round(elapsed, 1),
        "s_per_step": round(elapsed / max(step, 1), 3),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "samples": result,
        "first_key": keys[0],
    }


def score_line(result: dict) -> str:
    return ", ".join(
        f"{cap}{'*' if s['heldout'] else ''} {s['correct']}/{s['n']}" for cap, s in result.items()
    )


def _log_eval(path: Path, step: int, elapsed: float, result: dict | None) -> None:
    if result is not None:
        with path.open("a") as handle:
            record = {"step": step, "elapsed_s": round(elapsed, 1), "eval": result}
            handle.write(json.dumps(record) + "\n")
