"""Integer seed arithmetic for projectors that regenerate randomness instead of storing it.

The rules are Flora's (BorealisAI/flora-opt): a new seed is the 15th draw of ``randint``
from a CPU generator seeded with the old one, and a seed splits into two by the first two
draws. Keeping them means a Flora seed means the same thing here as there.
"""

from __future__ import annotations

import torch

_INT64_MAX = torch.iinfo(torch.int64).max


def _draws(seed: int, count: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, _INT64_MAX, (count,), generator=gen).tolist()


def next_seed(seed: int) -> int:
    return _draws(seed, 15)[-1]


def split_seed(seed: int) -> tuple[int, int]:
    left, right = _draws(seed, 2)
    return left, right


def seed_tensor(seed: int) -> torch.Tensor:
    """Seeds live in the state as int64 CPU tensors (read on the host, never synced)."""
    return torch.tensor(seed, dtype=torch.int64)
