"""The prepared accelerator run (`ctrak bench --device cuda --model-config sd15`) builds and
runs on CPU at a tiny size; its FE per sample is the default path's, analytic == hooks."""

from __future__ import annotations

import pytest

from jobs.cli import main
from pipeline.bench import device


def test_device_section_runs_tiny_on_cpu_in_both_dtypes(tmp_path):
    opts = {
        "model_config": "tiny",
        "device": "cpu",
        "dtypes": ["bfloat16", "float32"],
        "device_samples": 2,
        "batch_size": 2,
    }
    results, rows, description = device.run_device(tmp_path, opts)
    assert "SD 1.x layout" in description
    for name in ("bfloat16", "float32"):
        r = results[name]
        assert r["fe_counted"] == r["fe_analytic"]
        assert r["s_per_sample"] > 0 and r["samples_per_s"] == pytest.approx(1 / r["s_per_sample"])
        assert r["peak_memory_bytes"] is None  # not on cuda
        assert 0 < r["attributed_params"] < r["num_params"]
    assert {row.section for row in rows} == {"tiny bfloat16 on cpu", "tiny float32 on cpu"}


def test_sd15_config_is_stable_diffusion_15s_layout():
    c = device.MODEL_CONFIGS["sd15"]
    assert c["block_out_channels"] == (320, 640, 1280, 1280)
    assert (c["latent_size"], c["cross_attention_dim"], c["max_length"]) == (64, 768, 77)


def test_bad_dtype_is_named(capsys):
    assert main(["bench", "--model-config", "tiny", "--dtypes", "float16"]) == 2
    assert "ConfigError: --dtypes ['float16']" in capsys.readouterr().err
