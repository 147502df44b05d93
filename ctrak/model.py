"""Model adapter: a diffusers-format directory as the handful of functions the method needs.

A model directory holds `model_index.json` and one folder per component: `unet/`, `scheduler/`,
`text_encoder/` + `tokenizer/`, and optionally `vae/`. With a VAE the method works on latents
(the Stable Diffusion layout, x0 = vae.encode(image).mean * scaling_factor); without one, on
pixels (x0 = image in [-1, 1]). Weights load from safetensors only; nothing is fetched.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ctrak.attention import cross_attention_modules
from ctrak.errors import ConceptNotInPromptError, ImageShapeError, ModelLoadError, PromptError
from ctrak.numerics import upcast

_ALLOWED_LIBRARIES = ("diffusers", "transformers")
_REQUIRED = ("unet", "scheduler", "text_encoder", "tokenizer")


def _component_class(index: dict, name: str, path: Path) -> type:
    library, class_name = index[name][:2]
    if library not in _ALLOWED_LIBRARIES:
        raise ModelLoadError(
            f"{path}/model_index.json names {library}.{class_name} for '{name}'; only "
            f"{_ALLOWED_LIBRARIES} components are loaded. Save the model with diffusers."
        )
    module = importlib.import_module(library)
    if not hasattr(module, class_name):
        raise ModelLoadError(f"{library} has no class {class_name} (component '{name}' of {path})")
    return getattr(module, class_name)


DOCUMENT_SUFFIXES = (".md", ".png", ".jpg")  # notes beside a model: not part of what it computes
# records beside a model, not inputs: its draws' concept check (ctrak.toy.concept_check) and
# where its tokenizer's words came from (ctrak.toy.vocabulary; the words are tokenizer.json)
DOCUMENT_NAMES = ("concept_check.json", "vocabulary.json")


def _fingerprint(path: Path) -> str:
    """sha256 over every config and weight file of the directory, in sorted order (notes such
    as TRAINING.md, concept_check.json and tokenizer/vocabulary.json are left out: they do
    not change what the model computes)."""
    digest = hashlib.sha256()
    files = (
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix not in DOCUMENT_SUFFIXES and p.name not in DOCUMENT_NAMES
    )
    for file in sorted(files):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass
class DiffusionModel:
    """The frozen network and schedule. `eps` and the encoders never track weight gradients;
    per-sample gradients go through `torch.func.functional_call` with explicit parameters."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    vae: nn.Module | None
    alphas_cumprod: torch.Tensor  # (T,) float64
    prediction_type: str
    image_size: int
    path: str = ""
    _fingerprint: str | None = None

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DiffusionModel:
        """Load a diffusers-format directory. Raises ModelLoadError naming what is missing."""
        path = Path(path)
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ModelLoadError(
                f"{path} has no model_index.json: pass a diffusers model directory "
                "(saved with save_pretrained), e.g. ctrak/assets/toy-paper"
            )
        index = json.loads(index_file.read_text())
        missing = [name for name in _REQUIRED if name not in index or not (path / name).is_dir()]
        if missing:
            raise ModelLoadError(f"{path} lacks component(s) {missing}; expected {_REQUIRED}")
        parts: dict[str, object] = {}
        for name in ("unet", "text_encoder", "vae"):
            if name in index and index[name][0] is not None:
                klass = _component_class(index, name, path)
                kwargs = {"use_safetensors": True}
                if index[name][0] == "diffusers":
                    kwargs.update(torch_dtype=dtype, low_cpu_mem_usage=False)
                try:
                    module = klass.from_pretrained(path / name, **kwargs)
                except (OSError, ValueError) as err:  # no .safetensors (pickle .bin only), ...
                    raise ModelLoadError(
                        f"cannot load component '{name}' from {path / name}: {err}. Weights "
                        "load from .safetensors files only (pickle .bin/.pt files are refused); "
                        "convert them with safetensors or save the model with save_pretrained"
                    ) from None
                # diffusers components are loaded in `dtype` (torch_dtype above): cast only the
                # others, so diffusers keeps the modules it wants in float32 (and says nothing)
                if index[name][0] == "diffusers":
                    module = module.to(device=device)
                else:
                    module = module.to(device=device, dtype=dtype)
                parts[name] = module.eval().requires_grad_(False)
        tokenizer = _component_class(index, "tokenizer", path).from_pretrained(path / "tokenizer")
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        unet = parts["unet"]
        vae = parts.get("vae")
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        return cls(
            unet=unet,
            text_encoder=parts["text_encoder"],
            tokenizer=tokenizer,
            vae=vae,
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64),
            prediction_type=scheduler.config.prediction_type,
            image_size=int(unet.config.sample_size) * factor,
            path=str(path),
        )

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def clip_x0(self) -> float | None:
        """Sampling clamps x0_hat to [-1, 1] in pixel space (the data range); latents are
        not clamped."""
        return 1.0 if self.vae is None else None

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def fingerprint(self) -> str:
        """A content hash of the model directory (configs and weights)."""
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(Path(self.path)) if self.path else "in-memory"
        return self._fingerprint

    # ---- images <-> x0 -------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> None:
        """images (B, 3, H, W) in [-1, 1] with H = W = image_size, else ImageShapeError."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ImageShapeError(
                f"images must be a (B, 3, {self.image_size}, {self.image_size}) tensor, got "
                f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}"
            )
        _, channels, height, width = images.shape
        if channels != 3:
            raise ImageShapeError(f"images have {channels} channels; convert them to RGB (3)")
        if (height, width) != (self.image_size, self.image_size):
            raise ImageShapeError(
                f"images are {height}x{width} but this model takes {self.image_size}x"
                f"{self.image_size}; resize them before attribution"
            )
        if images.numel() and (images.min() < -1.0001 or images.max() > 1.0001):
            raise ImageShapeError("image values must lie in [-1, 1] (pixel / 127.5 - 1)")

    @torch.no_grad()
    def images_to_x0(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> x0 (B, C, h, w) float32 (latent mean or pixels)."""
        self.check_images(images)
        images = upcast(images.to(self.device, torch.promote_types(self.dtype, torch.float32)))
        if self.vae is None:
            return images
        latent = self.vae.encode(images.to(self.dtype)).latent_dist.mean
        return upcast(latent) * float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def x0_to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 (B, C, h, w) -> images (B, 3, H, W) clamped to [-1, 1]."""
        if self.vae is not None:
            latent = x0 / float(self.vae.config.scaling_factor)
            x0 = self.vae.decode(latent.to(self.dtype)).sample
        return upcast(x0).clamp(-1, 1)

    # ---- prompts -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], allow_empty: bool = False) -> torch.Tensor:
        """prompts (B,) -> conditioning (B, L, D). The empty prompt "" is the null condition
        and is accepted only with allow_empty=True (queries must name something)."""
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise PromptError(f"prompt {prompt!r} is not a string")
            if not allow_empty and not prompt.strip():
                raise PromptError("the prompt is empty; give the text the image was made from")
        hidden = self.text_encoder(self._token_ids(prompts).to(self.device))[0]
        return hidden.to(self.dtype)

    def _token_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts (B,) -> token ids (B, L), padded and truncated to the encoder's length."""
        length = self.tokenizer.model_max_length
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def concept_token_mask(self, prompt: str, concept: str) -> torch.Tensor:
        """(L,) float32 mask of the conditioning positions that hold the concept's tokens:
        1 where the prompt's tokens (as `encode_prompts` pads and truncates them) match the
        concept's tokens as a contiguous run, 0 elsewhere (every occurrence is marked)."""
        ids = self._token_ids([prompt])[0].tolist()
        word = self.tokenizer(concept, add_special_tokens=False).input_ids
        mask = torch.zeros(len(ids), dtype=torch.float32)
        for start in range(len(ids) - len(word) + 1 if word else 0):
            if ids[start : start + len(word)] == word:
                mask[start : start + len(word)] = 1.0
        if not mask.any():
            raise ConceptNotInPromptError(
                f"the tokens of concept {concept!r} do not occur in the tokens of prompt "
                f"{prompt!r} (first {len(ids)} tokens); name the concept as the prompt spells it"
            )
        return mask.to(self.device)

    def text_layer_names(self) -> list[str]:
        """Names of the UNet's linear maps applied to the text condition: the key and value
        projections of every cross-attention module (attn2.to_k / attn2.to_v in SD)."""
        return [
            f"{name}.{part}"
            for name, module in cross_attention_modules(self.unet).items()
            for part in ("to_k", "to_v")
            if hasattr(module, part)
        ]

    def null_condition(self, batch: int) -> torch.Tensor:
        """The empty-prompt condition repeated: (B, L, D)."""
        return self.encode_prompts([""], allow_empty=True).expand(batch, -1, -1)

    # ---- the network ---------------------------------------------------------------------
    def eps(
        self,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        cond: torch.Tensor,
        params: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """eps_theta(x_t, t, cond) in float32: x_t (B, C, h, w), cond (B, L, D) -> (B, C, h, w).

        `params` overrides UNet parameters by name (for torch.func); v-prediction models are
        converted to eps with eps = sqrt(abar) v + sqrt(1 - abar) x_t.
        """
        t_tensor = torch.as_tensor(t, device=x_t.device)
        args = (x_t.to(self.dtype), t_tensor)
        kwargs = {"encoder_hidden_states": cond.to(self.dtype)}
        if params is None:
            out = self.unet(*args, **kwargs).sample
        else:
            out = torch.func.functional_call(self.unet, params, args, kwargs).sample
        out = upcast(out)
        if self.prediction_type == "v_prediction":
            # in the precision of x_t (float64 while sampling): near abar = 0 the Tweedie
            # estimate divides by sqrt(abar) and float32 loses it
            dtype = torch.promote_types(out.dtype, upcast(x_t).dtype)
            abar = self.alphas_cumprod.to(x_t.device)[t_tensor].to(dtype)
            abar = abar.reshape(-1, *([1] * (x_t.dim() - 1)))
            out = abar.sqrt() * out.to(dtype) + (1 - abar).sqrt() * x_t.to(dtype)
        elif self.prediction_type != "epsilon":
            raise ModelLoadError(f"prediction_type {self.prediction_type!r} is not supported")
        return out

    def attributed_parameters(self, patterns: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """UNet parameters whose names contain any of `patterns` (all when empty), by name.

        Raises ModelLoadError when a pattern matches nothing, so a typo cannot silently
        attribute through zero parameters."""
        named = dict(self.unet.named_parameters())
        if not patterns:
            return named
        chosen = {n: p for n, p in named.items() if any(pat in n for pat in patterns)}
        if not chosen:
            raise ModelLoadError(
                f"no UNet parameter name contains any of {list(patterns)}; "
                f"examples of names: {list(named)[:3]}"
            )
        return chosen
