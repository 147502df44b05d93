"""The trainable parts of a toy training run (`ctrak.toy.train`): the base model (a copy of
--init or a fresh `build_tiny_model`), its UNet and text encoder as trainable modules with
AdamW and an EMA of the trained weights, and checkpoints (EMA weights as diffusers
directories, the full state to resume)."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctrak.model import DiffusionModel
from ctrak.seeds import derive_seed

log = logging.getLogger("ctrak.train_toy")


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


@dataclass
class Parts:
    """The trainable model of one run and what the loop needs of it."""

    base: Path  # the diffusers directory the run started from (tokenizer, scheduler, index)
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    prediction_type: str
    abar: torch.Tensor  # (T,) alphas_cumprod
    params: list[torch.nn.Parameter]  # the trained ones
    opt: torch.optim.Optimizer
    ema: list[torch.Tensor]  # EMA of `params`
    train_text: bool

    def encode(self, texts: list[str]) -> torch.Tensor:
        """texts (B,) -> the text encoder's hidden states (B, L, D)."""
        ids = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids)[0]


@dataclass
class Progress:
    """Where a run is: steps done, seconds trained, the logged records."""

    step: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)


def prepare_base(
    args: argparse.Namespace, out: Path, image_size: int, captions: list[str] | None = None
) -> Path:
    """OUT/base: a copy of --init (fine-tuning; its tokenizer must cover the captions), else a
    fresh `build_tiny_model` with the --prediction target written into its scheduler config
    and its vocabulary from `captions` per --vocabulary (`ctrak.toy.vocabulary`)."""
    from diffusers import DDPMScheduler

    from ctrak.toy import vocabulary
    from ctrak.toy.tiny import build_tiny_model

    captions = captions or []
    words, record = vocabulary.vocabulary_for(
        getattr(args, "vocabulary", "builtin"), captions, str(getattr(args, "data", ""))
    )

    base = out / "base"
    if args.init and not (base / "model_index.json").exists():
        # fine-tuning: the init model's components (weights included) are the starting point
        tmp = base.with_name("base.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(args.init, tmp, ignore=shutil.ignore_patterns("*.md", "*.json.bak"))
        tmp.rename(base)
    if not (base / "model_index.json").exists():
        build_tiny_model(
            base,
            image_size=image_size,
            block_out_channels=tuple(int(c) for c in args.channels.split(",")),
            layers_per_block=args.layers_per_block,
            text_dim=args.text_dim,
            text_layers=args.text_layers,
            words=words,
            max_length=max(8, vocabulary.longest_caption(captions)),
            seed=derive_seed(args.seed, "train-toy-init"),
        )
        vocabulary.write_record(base, record)
        sched = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        sched = DDPMScheduler.from_config(sched.config, prediction_type=args.prediction)
        sched.save_pretrained(base / "scheduler")
    check_covered(base, captions)
    return base


def check_covered(base: Path, captions: list[str]) -> None:
    """UnknownWordError when a training caption has a word the base tokenizer maps to [UNK]
    (an --init model trained on other words): the model would learn [UNK], silently."""
    from ctrak.tokens import UnknownWordError, unknown_words
    from ctrak.toy.vocabulary import caption_words

    tokenizer = DiffusionModel.load(base).tokenizer
    unknown = unknown_words(tokenizer, " ".join(caption_words(captions)))
    if unknown:
        raise UnknownWordError(
            f"the training captions have word(s) {unknown[:20]} that the tokenizer of {base} "
            "maps to [UNK]: the model would learn them as one unknown token. Train from scratch "
            "(no --init; the vocabulary is built from the captions) or --init from a model "
            "whose vocabulary holds them"
        )


def load_parts(args: argparse.Namespace, base: Path) -> Parts:
    """The UNet and text encoder of `base` as trainable modules (the encoder made separable,
    frozen or trained per --text-encoder), AdamW over the trained parameters, their EMA."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", use_safetensors=True)
    if args.text_encoder == "tokens":
        make_separable(text_encoder)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    train_text = args.text_encoder == "train"
    text_encoder.requires_grad_(train_text)
    modules = [unet, text_encoder] if train_text else [unet]
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return Parts(
        base=base,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=DiffusionModel.load(base).tokenizer,
        prediction_type=scheduler.config.prediction_type,
        abar=scheduler.alphas_cumprod.float(),
        params=params,
        opt=torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay),
        ema=[p.detach().clone() for p in params],
        train_text=train_text,
    )


def resume(parts: Parts, state_path: Path) -> Progress:
    """Load OUT/state.pt (weights, optimiser, EMA, progress) into `parts`."""
    state = torch.load(state_path, weights_only=False)
    parts.unet.load_state_dict(state["unet"])
    parts.text_encoder.load_state_dict(state["text_encoder"])
    parts.opt.load_state_dict(state["opt"])
    for e, v in zip(parts.ema, state["ema"], strict=True):
        e.copy_(v)
    log.info("resumed at step %d (%.0f s)", state["step"], state["elapsed"])
    return Progress(state["step"], state["elapsed"], state["history"])


def checkpoint(parts: Parts, progress: Progress, out: Path, tag: str) -> Path:
    """The EMA weights as OUT/checkpoints/TAG and OUT/model (diffusers directories), the
    training state as OUT/state.pt (atomically); returns the checkpoint's path."""
    ema_unet, ema_text = copy.deepcopy(parts.unet), copy.deepcopy(parts.text_encoder)
    ema_modules = [ema_unet, ema_text] if parts.train_text else [ema_unet]
    ema_params = [p for m in ema_modules for p in m.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, e in zip(ema_params, parts.ema, strict=True):
            p.copy_(e)
    path = save_model(parts.base, ema_unet, ema_text, out / "checkpoints" / tag)
    save_model(parts.base, ema_unet, ema_text, out / "model")
    state = {
        "unet": parts.unet.state_dict(),
        "text_encoder": parts.text_encoder.state_dict(),
        "opt": parts.opt.state_dict(),
        "ema": parts.ema,
        "step": progress.step,
        "elapsed": progress.elapsed,
        "history": progress.history,
    }
    state_path = out / "state.pt"
    torch.save(state, state_path.with_suffix(".tmp"))
    os.replace(state_path.with_suffix(".tmp"), state_path)
    return path
