"""``subspace_lion``: Lion in the subspace (Chen et al. 2023), reference and foreach bodies.

Per parameter: ``u = sign(b1 m + (1 - b1) R)``, ``m <- b2 m + (1 - b2) R``, then
``W <- W - lr * scale * back(u)`` with decoupled decay ``W <- (1 - lr wd) W`` before it.
Lion has no fused kernel; ``impl="fused"`` runs the foreach body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..projectors.base import Projector, Side
from ..rules.lion import lion_update
from ._apply import apply_folded, apply_reference


def subspace_lion(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Any],
    exp_avgs: Sequence[Tensor],
    state_steps: Sequence[int],
    *,
    projector: Projector | None = None,
    sides: Sequence[Side | None] | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    scale: float = 1.0,
    maximize: bool = False,
    impl: str = "foreach",
) -> None:
    """One Lion step for every parameter of a bucket (``state_steps`` unused: Lion has no
    bias correction; kept for one signature across rules)."""
    if impl not in ("reference", "foreach", "fused"):
        raise ValueError(f"Invalid impl: {impl!r} (expected reference, foreach or fused)")
    if not params:
        return
    sides = sides if sides is not None else [None] * len(params)
    if impl == "reference":
        for w, g, basis, m, side in zip(params, grads, bases, exp_avgs, sides, strict=True):
            direction = lion_update(-g if maximize else g, m, beta1=beta1, beta2=beta2)
            apply_reference(w, direction, basis, projector, side, scale, lr, lr * weight_decay,
                            decay_after=False)
        return
    if maximize:
        grads = torch._foreach_neg(grads)
    dirs = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
    torch._foreach_sign_(dirs)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
    apply_folded(params, dirs, bases, projector, sides, [-lr * scale] * len(params),
                 lr * weight_decay, decay_after=False)
