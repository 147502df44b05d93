"""The slider check (ctrak.toy.slider_check): w = 1 draws the prompt, w = 0 its negative, the
tally counts the target's value, and a bad attribute is refused."""

from __future__ import annotations

import numpy as np
import pytest

from ctrak.errors import ConfigError
from ctrak.generation import sample, to_uint8
from ctrak.toy.concept_check import CheckCombo, run_check
from ctrak.toy.slider_check import run_slider_check, slider_table

COMBOS = [
    CheckCombo("a red triangle", ("triangle", "red"), False),
    CheckCombo("a blue circle", ("circle", "blue"), True),
]


class Recorder:
    """A reader that keeps every image it is shown and reads a fixed (shape, colour)."""

    def __init__(self, reads=("triangle", "blue")):
        self.images: list[np.ndarray] = []
        self.reads = reads

    def __call__(self, image):
        self.images.append(image.copy())
        return self.reads


def test_weight_one_repeats_the_concept_check_and_zero_draws_the_negative(pixel_model):
    per_combo = 3
    slider = Recorder()
    run_slider_check(
        pixel_model,
        ("shape", "colour"),
        COMBOS,
        slider,
        "shape",
        weights=(0.0, 1.0),
        per_combo=per_combo,
        steps=4,
        seed=3,
    )
    plain = Recorder()
    run_check(
        pixel_model,
        ("shape", "colour"),
        COMBOS,
        plain,
        classifier={},
        per_combo=per_combo,
        steps=4,
        seed=3,
    )
    # slider order: combination i, weight w, draw j; the check's: combination i, draw j
    at = {
        (i, w): slider.images[(2 * i + w) * per_combo : (2 * i + w + 1) * per_combo]
        for i in range(2)
        for w in range(2)
    }
    for i in range(2):
        expected = plain.images[i * per_combo : (i + 1) * per_combo]
        got = np.stack(at[i, 1]).astype(int)  # the same noise, another batch: +-1 of rounding
        assert np.abs(got - np.stack(expected).astype(int)).max() <= 1
    negatives = ["a red", "a blue"]  # the caption without its shape
    for i, negative in enumerate(negatives):
        x0 = sample(
            pixel_model,
            [negative] * per_combo,
            seed=3,
            first_draw=i * per_combo,
            num_steps=4,
            guidance=1.0,
        )
        expected = to_uint8(pixel_model.x0_to_images(x0))
        got = np.stack(at[i, 0]).astype(int)
        assert np.abs(got - expected.astype(int)).max() <= 1
    # the w = 0 draws differ from the prompt's: the check can tell the two ends apart
    assert np.abs(np.stack(at[0, 0]).astype(int) - np.stack(at[0, 1]).astype(int)).max() > 8


def test_tally_counts_the_target_value_per_split_and_weight(pixel_model):
    check = run_slider_check(
        pixel_model,
        ("shape", "colour"),
        COMBOS,
        Recorder(reads=("triangle", "blue")),
        "colour",
        weights=(1.0, 2.0, 4.0),
        per_combo=2,
        steps=2,
    )
    # colour read "blue" always: the trained red triangle never, the held-out blue circle always
    assert check["trained"] == [[0, 2]] * 3
    assert check["heldout"] == [[2, 2]] * 3
    assert [row["negative"] for row in check["combos"]] == ["a triangle", "a circle"]
    table = slider_table(check)
    assert "| all heldout | 2 / 2 | 2 / 2 | 2 / 2 |" in table
    assert "| a red triangle | 0 / 2 | 0 / 2 | 0 / 2 |" in table


def test_an_unknown_attribute_is_refused(pixel_model):
    with pytest.raises(ConfigError, match="'size' is not an attribute"):
        run_slider_check(pixel_model, ("shape", "colour"), COMBOS, Recorder(), "size")


def test_check_concepts_cli_writes_both_checks_and_refuses_bad_input(tmp_path, capsys):
    import json

    from ctrak.toy.tiny import build_tiny_model
    from jobs.cli import main

    model_dir = build_tiny_model(tmp_path / "model", latent=False, seed=0)
    args = ["check-concepts", "--model", str(model_dir), "--per-combo", "1", "--steps", "2"]
    assert main(args) == 2  # no data_spec.json: which world's classifier?
    assert "names no built-in world" in capsys.readouterr().err
    (model_dir / "data_spec.json").write_text(json.dumps({"world": "paper"}))
    assert main([*args, "--slider", "shape", "--weights", "0,x"]) == 2
    assert "--weights '0,x': give numbers" in capsys.readouterr().err
    out = tmp_path / "slider.json"
    assert main([*args, "--slider", "shape", "--weights", "0,1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| shape slider | w = 0 | w = 1 |" in printed
    slider = json.loads(out.read_text())
    assert slider["weights"] == [0.0, 1.0] and len(slider["combos"]) == 4  # paper: 2 x 2
    assert not (model_dir / "concept_check.json").exists()  # the slider check never writes it
    assert main(args) == 0
    check = json.loads((model_dir / "concept_check.json").read_text())
    assert set(check["attributes"]) == {"shape", "colour"} and check["per_combo"] == 1
    assert "concept check (guidance 1, 1 draws per combination" in capsys.readouterr().out


def test_guide_t_limits_where_the_slider_acts(pixel_model):
    def draws(**kwargs):
        x0 = sample(pixel_model, ["a red triangle"] * 2, num_steps=4, negative="a red", **kwargs)
        return x0.numpy()

    prompt_alone = draws(guidance=1.0)
    everywhere = draws(guidance=4.0)
    assert np.abs(everywhere - prompt_alone).max() > 0.05
    # a range holding no sampling step is the prompt alone; one holding all is everywhere
    assert np.array_equal(draws(guidance=4.0, guide_t=(2000, 3000)), prompt_alone)
    assert np.array_equal(draws(guidance=4.0, guide_t=(0, 999)), everywhere)
    partly = draws(guidance=4.0, guide_t=(500, 999))
    assert not np.array_equal(partly, prompt_alone) and not np.array_equal(partly, everywhere)
