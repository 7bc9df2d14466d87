"""Integer seed arithmetic for projectors that regenerate randomness instead of storing it.

The rule is Flora's (BorealisAI/flora-opt): a new seed is the 15th draw of ``randint`` from
a CPU generator seeded with the old one. It runs on the host, at resamples only.
"""

from __future__ import annotations

import torch

_INT64_MAX = torch.iinfo(torch.int64).max


def _draws(seed: int, count: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, _INT64_MAX, (count,), generator=gen).tolist()


def next_seed(seed: int) -> int:
    return _draws(seed, 15)[-1]


def seed_tensor(seed: int) -> torch.Tensor:
    """Seeds live in the state as int64 CPU tensors (read on the host, never synced)."""
    return torch.tensor(seed, dtype=torch.int64)
