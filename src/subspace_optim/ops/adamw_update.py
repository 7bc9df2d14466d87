"""Ops: the projected AdamW update, and the block-wise 8-bit AdamW moment update.

``projected_adamw_update`` (weight ``m x n``, gradient and moments ``m x r`` with a right
basis ``r x n``, or ``r x n`` with a left basis ``m x r``; no basis: full rank, gradient and
moments of the weight's shape). One step of AdamW on the projected gradient ``R``::

    m <- b1 m + (1 - b1) R;  v <- b2 v + (1 - b2) R^2
    torch:  N = m / (sqrt(v) / sqrt(1 - b2^t) + eps),  c = 1 / (1 - b1^t)
    galore: N = m / (sqrt(v) + eps),                   c = sqrt(1 - b2^t) / (1 - b1^t)
    W <- W - lr * scale * c * back(N)   with decay W <- (1 - lr wd) W before (torch) or
                                        after (galore) the update

in the weight's dtype for the back-projection and in the moments' dtype for the rest.
Moments are updated in place; so is the weight. ``step`` is 1-based.

``blockwise8_adamw_update``: the same moment update on 8-bit block-wise moments (codes of
the gradient's shape, one float32 absmax per block of 256, bitsandbytes' dynamic maps,
signed for ``m`` and unsigned for ``v``): dequantise, update in float32, requantise in
place; returns ``N`` (float32) for the caller to back-project.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit
from ..rules.adamw import adamw_update
from ..rules.decoupled import apply_update_
from . import define


def _back_add(weight: Tensor, direction: Tensor, basis: Tensor | None, right: bool):
    def add(alpha):
        if basis is None:
            weight.add_(direction, alpha=alpha)
            return
        low, b = direction.to(weight.dtype), basis.to(weight.dtype)
        if right:
            weight.addmm_(low, b, alpha=alpha)
        else:
            weight.addmm_(b, low, alpha=alpha)
    return add


@define("projected_adamw_update", mutates_args=("weight", "exp_avg", "exp_avg_sq"))
def projected_adamw_update(
    weight: Tensor, grad: Tensor, basis: Tensor | None, exp_avg: Tensor, exp_avg_sq: Tensor,
    step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    scale: float, right: bool, galore: bool, correct_bias: bool, maximize: bool,
) -> None:
    if maximize:
        grad = -grad
    convention = "galore" if galore else "torch"
    direction, factor = adamw_update(grad, exp_avg, exp_avg_sq, step, beta1=beta1, beta2=beta2,
                                     eps=eps, correct_bias=correct_bias, convention=convention)
    apply_update_(weight, _back_add(weight, direction, basis, right), scale, lr * factor,
                  lr * weight_decay, decay_after=galore)


@projected_adamw_update.op.register_fake
def _(weight, grad, basis, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay,
      scale, right, galore, correct_bias, maximize) -> None:
    torch._check(weight.dim() == 2, lambda: f"weight must be a matrix, got {weight.shape}")
    torch._check(grad.shape == exp_avg.shape == exp_avg_sq.shape,
                 lambda: "grad, exp_avg and exp_avg_sq must have one shape")
    if basis is None:
        torch._check(grad.shape == weight.shape, lambda: "full rank: grad must match weight")
        return
    m, n = weight.shape
    expected = (grad.shape[1], n) if right else (m, grad.shape[0])
    torch._check(tuple(basis.shape) == expected,
                 lambda: f"basis of shape {tuple(basis.shape)}, expected {expected}")


@define("blockwise8_adamw_update",
        mutates_args=("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax"))
def blockwise8_adamw_update(
    grad: Tensor, exp_avg_codes: Tensor, exp_avg_absmax: Tensor, exp_avg_sq_codes: Tensor,
    exp_avg_sq_absmax: Tensor, step: int, beta1: float, beta2: float, eps: float,
    galore: bool, correct_bias: bool, maximize: bool,
) -> Tensor:
    if maximize:
        grad = -grad
    m = dequantize_blockwise_8bit(exp_avg_codes, exp_avg_absmax, signed=True)
    v = dequantize_blockwise_8bit(exp_avg_sq_codes, exp_avg_sq_absmax, signed=False)
    direction, _ = adamw_update(grad.float(), m, v, step, beta1=beta1, beta2=beta2, eps=eps,
                                correct_bias=correct_bias,
                                convention="galore" if galore else "torch")
    for codes, absmax, value, signed in ((exp_avg_codes, exp_avg_absmax, m, True),
                                         (exp_avg_sq_codes, exp_avg_sq_absmax, v, False)):
        new_codes, new_absmax = quantize_blockwise_8bit(value, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax)
    return direction


@blockwise8_adamw_update.op.register_fake
def _(grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, step, beta1,
      beta2, eps, galore, correct_bias, maximize):
    torch._check(exp_avg_codes.dtype == torch.uint8 and exp_avg_sq_codes.dtype == torch.uint8,
                 lambda: "8-bit moments are uint8 codes")
    torch._check(exp_avg_codes.shape == grad.shape == exp_avg_sq_codes.shape,
                 lambda: "codes must have the gradient's shape")
    return torch.empty_like(grad, dtype=torch.float32)
