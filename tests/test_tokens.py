"""The token-validity check (ctrak/tokens.py) refuses, naming the word, what the model cannot
see: an [UNK] word, a prompt past the encoder's limit, a negative equal to the prompt in
tokens; in the engine's query path and in `ctrak generate` (the pipeline's query: see
tests/test_faults_input.py). The tiny model's tokenizer is word-level, 8 tokens long."""

from __future__ import annotations

import pytest
import torch

from ctrak.attribution import Attributor, Query
from ctrak.config import AttributionConfig, GradientConfig, ProjectionConfig
from ctrak.tokens import (
    PromptTruncatedError,
    SameAsNegativeError,
    UnknownWordError,
    check_query_text,
    unknown_words,
)
from jobs.cli import main


def test_unknown_truncated_and_same_as_negative_are_refused_naming_the_word(pixel_model):
    tokenizer = pixel_model.tokenizer
    assert unknown_words(tokenizer, "a red pikachu in Style") == ["pikachu", "Style"]
    check_query_text(pixel_model, "a red triangle", "red", "a triangle")  # fine: no error
    with pytest.raises(UnknownWordError, match=r"concept 'pikachu' has word\(s\) \['pikachu'\]"):
        check_query_text(pixel_model, "a red triangle", "pikachu", "a red triangle")
    with pytest.raises(UnknownWordError, match=r"negative 'a pikachu'"):
        check_query_text(pixel_model, "a red triangle", None, "a pikachu")
    # 6 words + BOS + EOS = 8 tokens fit; 7 words do not: the 7th word is where it is cut
    check_query_text(pixel_model, "a red triangle in a drawing", None, "")
    with pytest.raises(PromptTruncatedError, match=r"9 tokens .* reads 8: the words from 'style'"):
        check_query_text(pixel_model, "a red triangle in a drawing style", None, "")
    with pytest.raises(SameAsNegativeError):  # the same ids, though not the same string
        check_query_text(pixel_model, "a red triangle", "red", "a  red   triangle")


def test_the_engine_query_refuses_before_any_gradient(pixel_model):
    config = AttributionConfig(
        gradient=GradientConfig(timesteps=(499,)), projection=ProjectionConfig(k=8)
    )
    attributor = Attributor(pixel_model, config)
    image = torch.zeros(1, 3, 16, 16)  # local scope (the default): one query image
    # the concept past the cut: the model would never see "drawing"
    long = Query("a red triangle in the style of drawing", concept="drawing", image=image)
    with pytest.raises(PromptTruncatedError, match=r"10 tokens .* from 'of' on"):
        attributor.query_gradient(long)
    with pytest.raises(UnknownWordError, match=r"'pikachu'"):
        attributor.query_gradient(Query("a red pikachu", concept="pikachu", image=image))


def test_generate_refuses_an_unknown_word(pixel_model_dir, tmp_path, capsys):
    out = tmp_path / "draws"
    args = ["generate", "--model", str(pixel_model_dir), "--num", "1", "--steps", "2"]
    assert main([*args, "--prompt", "a red pikachu", "--out", str(out)]) == 2
    assert "UnknownWordError: the prompt 'a red pikachu'" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--prompt", "a red circle", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 1
