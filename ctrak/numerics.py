"""Precision rules: the DPS direction, norms and features are computed in at least float32."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is (half/bfloat16 are promoted)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
