"""Applying an inner rule's update with decoupled weight decay, as a pure function.

``weight -= decay * weight`` comes before the update in torch's convention and after it in
galore-torch's; ``add_update(alpha)`` adds ``alpha * update`` into the weight (a plain add
for a full-rank parameter, a back-projection for a projected one).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def nonzero(value: float | Tensor) -> bool:
    return isinstance(value, Tensor) or value != 0


def apply_update_(weight: Tensor, add_update: Callable[[float | Tensor], None],
                  scale: float, step_size: float | Tensor, decay: float | Tensor,
                  decay_after: bool) -> None:
    """``weight <- weight - scale * step_size * update`` with decoupled decay ``decay``."""
    if not decay_after and nonzero(decay):
        weight.mul_(1 - decay)
    add_update(-scale * step_size)
    if decay_after and nonzero(decay):
        weight.add_(weight, alpha=-decay)
