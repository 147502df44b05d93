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
bakes in (docs/experiments.md, "Notes moved from docstrings"). v keeps
x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v well conditioned at every t (Lin et al. 2024).
`--prediction epsilon` trains the plain eps target. Text encoder modes:

- `tokens` (default): the encoder's attention and MLP branches are zeroed and it is frozen,
  so it maps each token to LayerNorm(token embedding + position embedding) and never mixes
  "red" into "triangle" - the separable prompt that lets the UNet compose held-out pairs;
- `frozen`: the random-init encoder, frozen; `train`: trained with the UNet.

Output folder: `model/` (the latest EMA weights, a diffusers directory that
`ctrak.model.DiffusionModel.load` reads), `checkpoints/step-NNNNNN/` (every few minutes),
`train_log.jsonl`, `train_config.json` and `state.pt` (to resume). Each checkpoint's samples
are drawn and classified by `ctrak.toy.samples`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ctrak.errors import ConfigError
from ctrak.model import DiffusionModel
from ctrak.seeds import generator
from ctrak.toy.parts import Parts, Progress, checkpoint, load_parts, prepare_base, resume

log = logging.getLogger("ctrak.train_toy")


# ---- data ----------------------------------------------------------------------------------
def load_shards(
    uri: str, storage_options: dict | None = None
) -> tuple[torch.Tensor, list[str], list[str], dict | None]:
    """All samples under `uri` -> (images (N, 3, H, W) in [-1, 1], captions, keys, spec)."""
    import fsspec

    from ctrak.toy.world_shards import read_samples

    rows = list(read_samples(uri, storage_options))
    images = np.stack([row["image"] for row in rows])  # (N, H, W, 3) uint8
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    spec_path = f"{root.rstrip('/')}/spec.json"
    spec = json.loads(fs.cat_file(spec_path)) if fs.exists(spec_path) else None
    return x0, [row["caption"] for row in rows], [row["key"] for row in rows], spec


def lr_at(step: int, *, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to lr / 10 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def attribute_words(captions: Sequence[str]) -> frozenset[str]:
    """The words that vary across the captions (those not in every caption): the attribute
    values of a templated world ("a red triangle": red, blue, triangle, circle; "a heart icon
    on blue": heart, moon, blue, orange)."""
    sets = [set(c.split()) for c in captions if c]
    return frozenset(set.union(*sets) - set.intersection(*sets)) if sets else frozenset()


def _attribute_drops(caption: str, attributes: frozenset[str] | None = None) -> list[str]:
    """ "a red triangle" -> ["a triangle", "a red"]: the caption without each attribute word
    (in caption order), spelled exactly as `ctrak.attribution.resolve_negative` spells a
    query's c-. `attributes`: the attribute words (None: the last two of a 3-word caption)."""
    from ctrak.attribution import resolve_negative

    words = caption.split()
    if attributes is None:
        attributes = frozenset(words[1:]) if len(words) == 3 else frozenset()
    found = [w for w in words if w in attributes]
    if len(found) != 2:
        return []
    return [resolve_negative(caption, word, None) for word in found]


def _drop_attributes(
    texts: list[str], p: float, seed: int, step: int, attributes: frozenset[str] | None = None
) -> list[str]:
    """Replace each caption, with probability p, by itself minus one attribute word (chosen
    uniformly), so the concept slider's c- ("a red", "a triangle") is a condition the model
    was trained on, as the per-attribute null label of the paper's class-conditional model."""
    gen = generator(seed, "train-toy-attribute-dropout", step)
    drop = torch.rand(len(texts), generator=gen) < p
    which = torch.randint(0, 2, (len(texts),), generator=gen)
    out = []
    for text, d, w in zip(texts, drop.tolist(), which.tolist(), strict=True):
        options = _attribute_drops(text, attributes)
        out.append(options[w] if d and options else text)
    return out


def labelled_set(args: argparse.Namespace):
    """The `LabelledSet` of --data with --labels (None without): bad keys or captions that do
    not hold the label values are refused here, before training."""
    if not getattr(args, "labels", None):
        if getattr(args, "caption_template", None):
            raise ConfigError("--caption-template needs --labels (the attribute keys)")
        return None
    from ctrak.toy.labelled import load_labelled

    return load_labelled(args.data, args.labels, caption_template=args.caption_template)


def final_concept_check(
    args: argparse.Namespace, world: str | None, labelled, out: Path
) -> dict | None:
    """The concept check of OUT/model at --guidance (`ctrak.toy.concept_check`), printed and
    written to OUT/model/concept_check.json; None with --check-per-combo 0 or neither a
    labelled set nor a built-in world to read the draws by."""
    from ctrak.toy.concept_check import labelled_check, save_check, summary_line, world_check

    if getattr(args, "check_per_combo", 0) <= 0:
        log.info("no concept check (--check-per-combo 0)")
        return None
    if labelled is None and not world:
        log.info("no concept check (pass --labels KEY,KEY for a labelled set)")
        return None
    model = DiffusionModel.load(out / "model")
    kwargs = dict(per_combo=args.check_per_combo, guidance=args.guidance, steps=args.sample_steps)
    if labelled is not None:
        from ctrak.toy.classifier import classifier_for

        classifier = classifier_for(labelled, out / "classifier", log.info)
        check = labelled_check(model, labelled, classifier, seed=args.seed, **kwargs)
    else:
        check = world_check(model, world, seed=args.seed, **kwargs)
    log.info("%s", summary_line(check))
    log.info("wrote %s", save_check(out / "model", check))
    return check


# ---- training ------------------------------------------------------------------------------
def evaluate_checkpoint(args: argparse.Namespace, world: str | None, path: Path) -> dict | None:
    """Draw and classify every combination with the checkpoint at `path` (its samples.png);
    None when --eval-per-combo is 0 or the world is unknown."""
    from ctrak.toy.samples import draw_grid, evaluate_samples, score_line

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


def loss_on_batch(
    parts: Parts,
    x0: torch.Tensor,
    cond: torch.Tensor,
    noise_gen: torch.Generator,
    min_snr_gamma: float,
) -> torch.Tensor:
    """x0 (B, 3, H, W), cond (B, L, D) -> the batch's DDPM loss (a scalar)."""
    abar = parts.abar
    # 1. forward noising at uniform t: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    t = torch.randint(0, len(abar), (x0.shape[0],), generator=noise_gen)
    eps = torch.randn(x0.shape, generator=noise_gen)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    # 2. prediction
    pred = parts.unet(x_t, t, encoder_hidden_states=cond).sample
    # 3. DDPM loss on the eps (or v) target, optionally min-SNR-gamma weighted
    v_pred = parts.prediction_type == "v_prediction"
    target = a.sqrt() * eps - (1 - a).sqrt() * x0 if v_pred else eps  # v or eps
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma > 0:
        snr = abar[t] / (1 - abar[t])
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / (snr + v_pred)
    return per_sample.mean()


class Batches:
    """The batch stream: a reshuffle of the n rows whenever one runs out, each batch's
    prompt-dropout draws from the same generator (replayable on resume)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.gen = generator(seed, "train-toy-batches")
        self.order, self.cursor = torch.randperm(n, generator=self.gen), 0

    def replay(self, steps: int) -> None:
        """Advance past `steps` batches (resume)."""
        for _ in range(steps):
            self.cursor += self.batch_size
            if self.cursor > self.n:
                self.order, self.cursor = (
                    torch.randperm(self.n, generator=self.gen),
                    self.batch_size,
                )
            torch.rand(self.batch_size, generator=self.gen)

    def next(self, prompt_dropout: float) -> tuple[torch.Tensor, list[bool]]:
        """-> (row indices (B,), per row whether its caption is dropped)."""
        if self.cursor + self.batch_size > self.n:
            self.order, self.cursor = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        drop = torch.rand(len(idx), generator=self.gen) < prompt_dropout
        return idx, drop.tolist()


def train(args: argparse.Namespace) -> dict:
    """The training loop; returns the summary written to --json."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # 1. data into memory
    x0_all, captions, keys, spec = load_shards(args.data)
    labelled = labelled_set(args)  # checked before any training
    n, _, height, _ = x0_all.shape
    world = args.world or (spec or {}).get("world")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config.update(data_spec=spec, num_train_images=n, image_size=height, world=world)
    (out / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # 2. model from the tiny builder (or --init), then its components as trainable modules
    parts = load_parts(args, prepare_base(args, out, height, captions))
    attributes = attribute_words(list(dict.fromkeys(captions)))
    n_params = sum(p.numel() for p in parts.unet.parameters())
    # 3. resume
    state_path = out / "state.pt"
    progress = resume(parts, state_path) if args.resume and state_path.exists() else Progress()
    # 4. the loop
    cond_cache = None
    if not parts.train_text:  # a frozen encoder: each caption's condition computed once
        with torch.no_grad():
            texts = {*captions, *(a for c in captions for a in _attribute_drops(c, attributes)), ""}
            cond_cache = {text: parts.encode([text])[0] for text in texts}
    batches = Batches(n, args.batch_size, args.seed)
    batches.replay(progress.step)
    noise_gen = generator(args.seed, "train-toy-noise", progress.step)
    log_path = out / "train_log.jsonl"
    last_ckpt, loss_avg = progress.elapsed, None
    start = time.time() - progress.elapsed
    parts.unet.train()
    while progress.step < args.steps and progress.elapsed < args.max_minutes * 60:
        step = progress.step
        idx, drop = batches.next(args.prompt_dropout)
        texts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop, strict=True)]
        if args.attribute_dropout > 0:  # own stream: runs without it keep their batches
            texts = _drop_attributes(texts, args.attribute_dropout, args.seed, step, attributes)
        if cond_cache is not None:
            cond = torch.stack([cond_cache[s] for s in texts])
        else:
            cond = parts.encode(texts)
        loss = loss_on_batch(parts, x0_all[idx], cond, noise_gen, args.min_snr_gamma)
        for group in parts.opt.param_groups:
            group["lr"] = lr_at(step, lr=args.lr, warmup=args.warmup, total=args.steps)
        parts.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.params, 1.0)
        parts.opt.step()
        # EMA of the trained weights (decay ramps up early)
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(parts.ema, [p.detach() for p in parts.params], 1 - decay)
        progress.step = step = step + 1
        progress.elapsed = time.time() - start
        loss_value = loss.item()
        loss_avg = loss_value if loss_avg is None else 0.98 * loss_avg + 0.02 * loss_value
        if step % args.log_every == 0 or step == 1:
            _log_step(log_path, progress, loss_value, loss_avg, parts.opt.param_groups[0]["lr"])
        if progress.elapsed - last_ckpt >= args.ckpt_minutes * 60:
            path = checkpoint(parts, progress, out, f"step-{step:06d}")
            _log_eval(log_path, step, progress.elapsed, evaluate_checkpoint(args, world, path))
            last_ckpt = progress.elapsed = time.time() - start
    # 5. the final checkpoint, its samples, the summary
    final = checkpoint(parts, progress, out, f"step-{progress.step:06d}")
    result = evaluate_checkpoint(args, world, final)
    _log_eval(log_path, progress.step, progress.elapsed, result)
    if args.grid and result is not None:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(final / "samples.png", args.grid)
    check = final_concept_check(args, world, labelled, out)
    losses = [r["loss_avg"] for r in progress.history]
    return {
        "model": str(out / "model"),
        "checkpoint": str(final),
        "world": world,
        "data_spec": spec,
        "num_train_images": n,
        "image_size": height,
        "unet_params": n_params,
        "text_encoder": args.text_encoder,
        "steps": progress.step,
        "batch_size": args.batch_size,
        "wall_s": round(progress.elapsed, 1),
        "s_per_step": round(progress.elapsed / max(progress.step, 1), 3),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "samples": result,
        "concept_check": check,
        "first_key": keys[0],
    }


def _log_step(path: Path, progress: Progress, loss: float, loss_avg: float, lr: float) -> None:
    step, elapsed = progress.step, progress.elapsed
    record = {
        "step": step,
        "loss": round(loss, 5),
        "loss_avg": round(loss_avg, 5),
        "lr": lr,
        "elapsed_s": round(elapsed, 1),
        "s_per_step": round(elapsed / step, 3),
    }
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    progress.history.append(record)
    log.info("step %d loss %.4f (avg %.4f) %.2f s/step", step, loss, loss_avg, elapsed / step)


def _log_eval(path: Path, step: int, elapsed: float, result: dict | None) -> None:
    if result is not None:
        with path.open("a") as handle:
            record = {"step": step, "elapsed_s": round(elapsed, 1), "eval": result}
            handle.write(json.dumps(record) + "\n")
