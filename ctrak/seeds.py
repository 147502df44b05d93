"""Derived randomness: every seed is a function of (base seed, purpose, index...).

No code in ctrak draws from the global RNG; it asks `generator(base, purpose, *index)` for an
explicit `torch.Generator`, so a projection block or a noise draw is the same in every process.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(base: int, purpose: str, *index: int | str) -> int:
    """A 63-bit seed from (base, purpose, index...), stable across processes and platforms."""
    text = "\x1f".join([str(int(base)), purpose, *(str(i) for i in index)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(base: int, purpose: str, *index: int | str) -> torch.Generator:
    """A CPU generator seeded with `derive_seed(base, purpose, *index)`."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(base, purpose, *index))
