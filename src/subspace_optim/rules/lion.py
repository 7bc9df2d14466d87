"""The Lion rule (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023) as a
pure function: ``u = sign(beta1 m + (1 - beta1) g)``, then ``m <- beta2 m + (1 - beta2) g``."""

from __future__ import annotations

from torch import Tensor


def lion_update(grad: Tensor, exp_avg: Tensor, *, beta1: float, beta2: float) -> Tensor:
    """Update ``exp_avg`` in place; return the sign direction (the update is ``-lr * u``)."""
    direction = exp_avg.lerp(grad, 1 - beta1).sign_()
    exp_avg.lerp_(grad, 1 - beta2)
    return direction
