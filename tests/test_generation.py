"""Generation guided along a concept slider (`ctrak generate --concept`): the slider
eps(c) - eps(c-) is Concept-TRAK's query direction, so pushing the sampler along it must
strengthen the concept (the issue's "the slider direction should change the generated
attribute"). Known answer on the shipped toy model: "a red triangle" against "a triangle"."""

from __future__ import annotations

import json

from ctrak.errors import ConceptNotInPromptError
from ctrak.generation import generate_images, to_uint8
from ctrak.model import DiffusionModel
from ctrak.toy import DEFAULT_MODEL
from ctrak.toy.worlds import classify
from jobs.cli import main


def _colours(images) -> list[str | None]:
    return [classify(array, "paper")[1] for array in to_uint8(images)]


def test_the_colour_slider_turns_the_negatives_draws_red():
    model = DiffusionModel.load(DEFAULT_MODEL)
    prompts = ["a red triangle"] * 8
    # guidance 0 draws the negative alone; 4 goes along the "red" slider from there
    negative_only = _colours(
        generate_images(model, prompts, num_steps=25, guidance=0.0, negative="a triangle")
    )
    along = _colours(
        generate_images(model, prompts, num_steps=25, guidance=4.0, negative="a triangle")
    )
    # measured: 3 of 8 red for "a triangle" (triangles were blue in training), 8 of 8 along
    assert negative_only.count("red") <= 5, negative_only
    assert along.count("red") >= 7, along


def test_generate_cli_resolves_the_concept_to_its_negative(tmp_path, capsys):
    summary = tmp_path / "gen.json"
    argv = ["generate", "--model", str(DEFAULT_MODEL), "--prompt", "a red triangle"]
    argv += ["--concept", "red", "--num", "1", "--steps", "2", "--out", str(tmp_path / "png")]
    assert main([*argv, "--json", str(summary)]) == 0
    assert "against 'a triangle'" in capsys.readouterr().out
    assert json.loads(summary.read_text())["negative"] == "a triangle"
    assert main([*argv[:-2], "--concept", "green", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"{ConceptNotInPromptError.__name__}: concept 'green' does not occur" in err
    assert not (tmp_path / "none").exists()  # refused before anything was written
