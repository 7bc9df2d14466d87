"""Row selection designs for Grass, as pure functions of a weight vector and a generator."""

from __future__ import annotations

import torch
from torch import Tensor


def inclusion_probabilities(weights: Tensor, count: int) -> Tensor:
    """Probabilities ``pi_i = min(1, c w_i)`` with ``sum(pi) = count``: proportional to the
    weights, capped at 1 (a row that would need ``pi > 1`` is always taken and the rest of
    the budget is shared by the others). Zero-weight rows share a leftover budget evenly."""
    w = weights.double().clamp(min=0)
    capped = torch.zeros_like(w, dtype=torch.bool)
    pi = torch.zeros_like(w)
    for _ in range(count + 1):
        free = ~capped
        budget = count - int(capped.sum())
        free_weight = torch.where(free, w, 0.0)
        total = float(free_weight.sum())
        if total > 0:
            pi = torch.where(capped, 1.0, budget * free_weight / total)
        else:
            pi = torch.where(capped, 1.0, torch.full_like(w, budget / int(free.sum())))
        over = free & (pi > 1)
        if not bool(over.any()):
            break
        capped |= over
    return pi.clamp(max=1.0)


def systematic_sample(pi: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """Draw ``count`` distinct indices with inclusion probabilities exactly ``pi``
    (``sum(pi) = count``, each ``pi <= 1``): systematic sampling, i.e. points
    ``u, u + 1, ..., u + count - 1`` (``u ~ U[0, 1)``) read against the cumulative sum of
    ``pi``. Each interval is at most 1 long, so no index is drawn twice."""
    edges = torch.cumsum(pi.double(), dim=0)
    edges = edges * (count / edges[-1])
    u = torch.rand((), generator=generator, device=pi.device, dtype=torch.float64)
    points = u + torch.arange(count, device=pi.device, dtype=torch.float64)
    return torch.searchsorted(edges, points, right=True).clamp(max=pi.numel() - 1)
