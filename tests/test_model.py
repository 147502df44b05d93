"""Model adapter: SD-shaped and pixel directories load back and behave like the raw modules."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from helpers import random_images

from ctrak.errors import ImageShapeError, ModelLoadError, PromptError
from ctrak.model import DiffusionModel


def test_sd_shaped_directory_round_trips(latent_model_dir, latent_model64):
    model = latent_model64
    assert model.vae is not None and model.image_size == 16
    index = json.loads((latent_model_dir / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    images = random_images(2, dtype=torch.float64)
    x0 = model.images_to_x0(images)
    assert x0.shape == (2, 4, 8, 8)
    # latent = mean of the raw VAE posterior times the scaling factor
    vae = AutoencoderKL.from_pretrained(latent_model_dir / "vae").double()
    expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(x0, expected)
    # eps equals a direct call of the saved UNet
    unet = UNet2DConditionModel.from_pretrained(latent_model_dir / "unet").double()
    cond = model.encode_prompts(["a red triangle", "a blue circle"])
    assert cond.shape == (2, 8, 32)
    direct = unet(x0, 321, encoder_hidden_states=cond).sample
    torch.testing.assert_close(model.eps(x0, 321, cond), direct)
    assert model.x0_to_images(x0).shape == (2, 3, 16, 16)


def test_pixel_directory_and_null_condition(pixel_model64):
    model = pixel_model64
    assert model.vae is None and model.image_size == 16
    images = random_images(1, dtype=torch.float64)
    torch.testing.assert_close(model.images_to_x0(images), images)
    null = model.null_condition(3)
    assert null.shape[0] == 3
    torch.testing.assert_close(null[0], model.encode_prompts([""], allow_empty=True)[0])
    assert not torch.allclose(null[0], model.encode_prompts(["a red circle"])[0])


def test_attributed_parameter_filter(pixel_model64):
    attn2 = pixel_model64.attributed_parameters(("attn2",))
    assert attn2 and all("attn2" in name for name in attn2)
    assert len(pixel_model64.attributed_parameters()) > len(attn2)
    with pytest.raises(ModelLoadError, match="no UNet parameter"):
        pixel_model64.attributed_parameters(("atn2",))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(1, 3, 32, 32), "32x32"),
        (torch.zeros(1, 1, 16, 16), "1 channels"),
        (torch.zeros(3, 16, 16), "tensor"),
        (torch.full((1, 3, 16, 16), 255.0), r"\[-1, 1\]"),
    ],
)
def test_bad_images_are_named(pixel_model, images, message):
    with pytest.raises(ImageShapeError, match=message):
        pixel_model.images_to_x0(images)


def test_empty_prompt_is_rejected_for_queries(pixel_model):
    with pytest.raises(PromptError, match="empty"):
        pixel_model.encode_prompts(["  "])


def test_missing_component_is_named(tmp_path, pixel_model_dir):
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        DiffusionModel.load(tmp_path)
    index = json.loads((pixel_model_dir / "model_index.json").read_text())
    del index["text_encoder"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="text_encoder"):
        DiffusionModel.load(broken)


def test_fingerprint_covers_configs_and_weights_not_notes(pixel_model_dir, tmp_path):
    import shutil

    from ctrak.model import _fingerprint

    copy = tmp_path / "model"
    shutil.copytree(pixel_model_dir, copy)
    before = _fingerprint(copy)
    (copy / "TRAINING.md").write_text("how this checkpoint was made, edited\n")
    assert _fingerprint(copy) == before  # a note beside the model changes nothing it computes
    config = copy / "unet" / "config.json"
    body = json.loads(config.read_text())
    body["_note"] = "changed"
    config.write_text(json.dumps(body))
    assert _fingerprint(copy) != before
    weights = next((copy / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert _fingerprint(copy) not in (before, _fingerprint(pixel_model_dir))
