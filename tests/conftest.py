"""Shared fixtures: tiny models built from config (pixel and SD-shaped latent layouts)."""

from __future__ import annotations

import os

import pytest
import torch

# S3 server and Ray cluster fixtures (session-scoped, started on demand)
pytest_plugins = ["services"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    # one thread per process: the suite shares 2 cores with Ray workers, and oversubscribed
    # OpenMP pools spin-wait each other into 10-50x slowdowns
    torch.set_num_threads(1)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def pixel_model_dir(tmp_path_factory):
    from ctrak.toy.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("pixel") / "model", latent=False, seed=0)


@pytest.fixture(scope="session")
def latent_model_dir(tmp_path_factory):
    from ctrak.toy.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("latent") / "model", latent=True, seed=1)


@pytest.fixture(scope="session")
def pixel_model(pixel_model_dir):
    from ctrak.model import DiffusionModel

    return DiffusionModel.load(pixel_model_dir)


@pytest.fixture(scope="session")
def pixel_model64(pixel_model_dir):
    from ctrak.model import DiffusionModel

    return DiffusionModel.load(pixel_model_dir, dtype=torch.float64)


@pytest.fixture(scope="session")
def latent_model64(latent_model_dir):
    from ctrak.model import DiffusionModel

    return DiffusionModel.load(latent_model_dir, dtype=torch.float64)
