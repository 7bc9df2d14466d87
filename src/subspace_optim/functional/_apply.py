"""Landing a rule's update in the weights: back-projection with the decay folded in."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..projectors.base import Projector, Side
from ..rules.decoupled import apply_update_


def apply_reference(weight: Tensor, direction: Tensor, basis: Any, projector: Projector | None,
                    side: Side | None, scale: float, step_size: float, decay: float,
                    decay_after: bool) -> None:
    """One parameter, the original arithmetic: decay as its own pass over the weight, before
    (torch) or after (galore-torch) the update ``-scale * step_size * back(direction)``."""
    if basis is None:
        def add(alpha):
            weight.add_(direction, alpha=alpha)
    else:
        def add(alpha):
            projector.update_weight_(basis, direction, side, weight, alpha)
    apply_update_(weight, add, scale, step_size, decay, decay_after)


def apply_folded(weights: Sequence[Tensor], directions: Sequence[Tensor],
                 bases: Sequence[Any], projector: Projector | None,
                 sides: Sequence[Side | None], alphas: Sequence[float | Tensor],
                 decay: float | Tensor, decay_after: bool) -> None:
    """``W <- (1 - decay) W + alpha * back(direction)`` for every parameter, with the decay
    as the GEMM's ``beta`` (the weight is read and written once). ``decay_after`` (galore's
    order, ``W <- (W + alpha back(d)) (1 - decay)``) scales alpha by ``1 - decay`` instead."""
    beta = 1 - decay
    plain = not isinstance(beta, Tensor)
    for weight, direction, basis, side, alpha in zip(weights, directions, bases, sides, alphas,
                                                     strict=True):
        if decay_after:
            alpha = alpha * beta
        if basis is not None and plain and not isinstance(alpha, Tensor):
            projector.update_weight_(basis, direction, side, weight, alpha, beta)
        elif basis is None:
            if not _is_one(beta):
                weight.mul_(beta)
            weight.add_(direction.to(weight.dtype), alpha=alpha)
        else:
            # Tensor hyperparameters (capturable style) cannot be GEMM scalars: scale the
            # direction instead, and decay in its own pass.
            if not _is_one(beta):
                weight.mul_(beta)
            projector.update_weight_(basis, direction * alpha, side, weight, 1.0)


def _is_one(value: float | Tensor) -> bool:
    return not isinstance(value, Tensor) and value == 1.0
