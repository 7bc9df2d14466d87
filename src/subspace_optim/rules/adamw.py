"""The AdamW inner rule as a pure function on tensors.

It never touches a parameter: it updates the moments in place and returns the direction
``N`` and a step factor ``c`` such that the parameter's update is ``-lr * c * N`` (for a
projected parameter, ``-lr * scale * c * project_back(N)``). The same rule therefore serves
full-rank and low-rank parameters alike.

Two conventions exist in the wild and users of each expect theirs bit for bit:

* ``"torch"`` (``torch.optim.AdamW``): ``N = m / (sqrt(v) / sqrt(1 - b2^t) + eps)``,
  ``c = 1 / (1 - b1^t)``; weight decay ``p *= 1 - lr * wd`` *before* the update.
* ``"galore"`` (galore-torch, copied from transformers' old AdamW):
  ``N = m / (sqrt(v) + eps)``, ``c = sqrt(1 - b2^t) / (1 - b1^t)``; weight decay
  ``p -= lr * wd * p`` *after* the update. The effective eps is ``eps / sqrt(1 - b2^t)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CONVENTIONS = ("torch", "galore")


def adamw_factor(step: int, beta1: float, beta2: float, correct_bias: bool,
                 convention: str) -> float:
    """The step factor ``c`` of :func:`adamw_update` for ``step`` (1-based)."""
    bias1 = 1 - beta1**step if correct_bias else 1.0
    bias2 = 1 - beta2**step if correct_bias else 1.0
    return 1 / bias1 if convention == "torch" else math.sqrt(bias2) / bias1


def adamw_update(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    correct_bias: bool = True,
    convention: str = "torch",
) -> tuple[Tensor, float]:
    """One AdamW moment update; returns ``(N, c)`` as described in the module docstring.

    ``step`` is the 1-based count of updates including this one. ``exp_avg`` and
    ``exp_avg_sq`` are updated in place and must have ``grad``'s shape.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1**step if correct_bias else 1.0
    bias2 = 1 - beta2**step if correct_bias else 1.0
    denom = exp_avg_sq.sqrt()
    if convention == "torch":
        denom.div_(math.sqrt(bias2)).add_(eps)
        factor = 1 / bias1
    else:
        denom.add_(eps)
        factor = math.sqrt(bias2) / bias1
    # The quotient overwrites denom: no second grad-sized temporary (a strided denom, e.g.
    # the moments of a column-major basis, takes a new tensor: torch.compile cannot trace
    # out= into one; the same division either way).
    if denom.is_contiguous():
        return torch.div(exp_avg, denom, out=denom), factor
    return exp_avg / denom, factor
