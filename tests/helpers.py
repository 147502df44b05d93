"""Small test helpers shared by the test modules."""

from __future__ import annotations

import torch


def random_images(n: int, size: int = 16, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(n, 3, size, size) images in [-1, 1] from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=gen) * 2 - 1).to(dtype)
