"""The vocabulary of a toy model's word-level tokenizer, and where its words came from.

`ctrak train-toy` builds it from the captions it trains on (`--vocabulary captions`, the
default): every word of every caption, as the tokenizer's own pre-tokenizer splits it
(whitespace and punctuation), sorted. So no caption word becomes [UNK], and a query word the
model never saw is refused at generate / query / eval (`ctrak.tokens`) instead of being
attributed as "something unknown". `--vocabulary builtin` keeps the fixed 32 words
`ctrak.toy.tiny.DEFAULT_WORDS` the shipped toy models were trained with (their TRAINING.md
commands); `--vocabulary builtin+captions`: those 32 words followed by the caption words they
lack, in order of first appearance (whitespace-split). The record is written to
MODEL/tokenizer/vocabulary.json, beside the tokenizer files, so it travels with every
checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ctrak.errors import ConfigError

VOCAB_FILE = "vocabulary.json"
MODES = ("captions", "builtin", "builtin+captions")


def caption_words(captions: Sequence[str]) -> list[str]:
    """Every word of the captions as the word-level tokenizer splits them, sorted."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    return sorted({word for text in captions for word, _ in split.pre_tokenize_str(text)})


def longest_caption(captions: Sequence[str]) -> int:
    """Tokens of the longest caption, BOS and EOS included."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    return max((len(split.pre_tokenize_str(t)) for t in captions), default=0) + 2


def vocabulary_for(mode: str, captions: Sequence[str], data: str) -> tuple[list[str], dict]:
    """-> (the words, the record written to tokenizer/vocabulary.json)."""
    from ctrak.toy.tiny import DEFAULT_WORDS

    if mode == "captions":
        words = caption_words(captions)
        source = f"the words of the {len(captions)} training captions under {data}"
    elif mode == "builtin":
        words = list(DEFAULT_WORDS)
        source = "ctrak.toy.tiny.DEFAULT_WORDS (fixed; the shipped toy models' vocabulary)"
    elif mode == "builtin+captions":
        seen = [w for text in dict.fromkeys(captions) for w in text.split()]
        words = list(dict.fromkeys([*DEFAULT_WORDS, *seen]))
        source = (
            "ctrak.toy.tiny.DEFAULT_WORDS, then the words of the "
            f"{len(captions)} training captions under {data} that it lacks"
        )
    else:
        raise ConfigError(f"--vocabulary {mode!r} is not one of {list(MODES)}")
    record = {"mode": mode, "source": source, "data": data, "words": words}
    return words, record


def write_record(model_dir: str | Path, record: dict) -> Path:
    path = Path(model_dir) / "tokenizer" / VOCAB_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
