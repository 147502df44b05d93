"""One token-validity check for every text the model is conditioned on at query time.

A query (`Attributor.query_gradient`: `ctrak query`, the pipeline's query job, `ctrak eval`)
and `ctrak generate` call `check_query_text` before any gradient or sample. It refuses, with a
named error naming the word:

1. a word of the prompt, concept or negative that the tokenizer maps to its unknown token
   (`[UNK]`): the model sees "something unknown", not the word, so a ranking for it measures
   nothing (UnknownWordError);
2. a prompt or negative longer than the text encoder reads (`model_max_length` tokens with
   BOS/EOS): the tokenizer would cut it silently, and a concept past the cut is never seen
   (PromptTruncatedError). Refused rather than warned: a warning scrolls past in a batch job
   while the ranking it precedes looks like any other (scores ~0.19 in the case found by
   hand); shortening the prompt costs the user one edit and loses nothing;
3. a prompt and negative that tokenise to the same ids (after the encoder's padding and
   truncation): the concept direction eps(c) - eps(c-) is zero, every score is noise
   (SameAsNegativeError).

Training captions are not checked here: featurize conditions on them as the model was trained
(truncated like every CLIP caption); an over-long caption is a reject (job.max_caption_bytes).
"""

from __future__ import annotations

from ctrak.errors import PromptError


class UnknownWordError(PromptError):
    """A word of a prompt, concept or negative maps to the tokenizer's unknown token."""


class PromptTruncatedError(PromptError):
    """A prompt (or negative) is longer than the text encoder reads; it would be cut."""


class SameAsNegativeError(PromptError):
    """The prompt and its negative tokenise identically: the concept direction is zero."""


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special).input_ids)


def unknown_words(tokenizer, text: str) -> list[str]:
    """The whitespace-separated words of `text` that contain the tokenizer's unknown token
    (none for a tokenizer without one, e.g. byte-level BPE)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    return [word for word in text.split() if unk in _ids(tokenizer, word, special=False)]


def check_text(tokenizer, text: str, role: str) -> None:
    """UnknownWordError / PromptTruncatedError for one text (`role`: "prompt", "concept",
    "negative" - names it in the message)."""
    unknown = unknown_words(tokenizer, text)
    if unknown:
        raise UnknownWordError(
            f"the {role} {text!r} has word(s) {unknown} that this model's tokenizer maps to "
            f"its unknown token {tokenizer.unk_token!r}: the model never saw them, so nothing "
            "can be attributed to them. Use words of the model's vocabulary (the captions it "
            "was trained on)"
        )
    limit = int(tokenizer.model_max_length)
    ids = _ids(tokenizer, text, special=True)
    if len(ids) > limit:
        # the first word whose tokens end past the cut (BOS first, EOS takes the last place)
        used, cut = len(ids) - len(_ids(tokenizer, text, special=False)) - 1, ""
        for word in text.split():
            used += len(_ids(tokenizer, word, special=False))
            if used > limit - 1:
                cut = word
                break
        raise PromptTruncatedError(
            f"the {role} {text!r} is {len(ids)} tokens but the text encoder reads {limit}: "
            f"the words from {cut!r} on would be cut silently and never conditioned on. "
            "Shorten it"
        )


def check_query_text(model, prompt: str, concept: str | None, negative: str) -> None:
    """Refuse a query (or generation) whose texts the model cannot represent (module doc).
    `model`: a `DiffusionModel`; `negative`: the resolved c- ("" = the null condition)."""
    tokenizer = model.tokenizer
    check_text(tokenizer, prompt, "prompt")
    if concept is not None and concept.strip():
        check_text(tokenizer, concept, "concept")
    if negative:
        check_text(tokenizer, negative, "negative")
    ids = model._token_ids([prompt, negative])
    if bool((ids[0] == ids[1]).all()):
        raise SameAsNegativeError(
            f"the prompt {prompt!r} and its negative {negative!r} tokenise identically, so "
            "the concept direction eps(c) - eps(c-) is zero and every score is noise. Give a "
            "negative without the concept (or a concept that is part of the prompt)"
        )
