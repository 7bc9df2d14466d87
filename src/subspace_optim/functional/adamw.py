"""``subspace_adamw``: AdamW in the subspace, three bodies of one signature.

Per parameter, with ``R`` its (projected) gradient and ``t`` its 1-based step::

    m <- b1 m + (1 - b1) R;  v <- b2 v + (1 - b2) R^2
    torch:  N = m / (sqrt(v) / sqrt(1 - b2^t) + eps),  c = 1 / (1 - b1^t)
    galore: N = m / (sqrt(v) + eps),                   c = sqrt(1 - b2^t) / (1 - b1^t)
    W <- W - lr * scale * c * back(N), with decoupled decay W <- (1 - lr wd) W before
    (torch) or after (galore) it

The foreach body computes ``-c N`` for the whole bucket with torch's multi-tensor fused
AdamW kernel (``torch._fused_adamw_``, on CPU and CUDA) applied to zero buffers with lr 1 and
no decay; galore's eps placement is torch's with ``eps / sqrt(1 - b2^t)``, so parameters are
grouped by step. Where that kernel does not apply (no bias correction, another device, under
``torch.compile``, where the same arithmetic as ``torch._foreach_*`` ops fuses anyway) it
uses those ops. Each matrix then takes one GEMM for its back-projection, with the decay as
the GEMM's ``beta``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import ops
from ..projectors.base import Projector, Side
from ..rules.adamw import adamw_update
from ._apply import apply_folded, apply_reference


def subspace_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Any],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[int],
    *,
    projector: Projector | None = None,
    sides: Sequence[Side | None] | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float = 1.0,
    correct_bias: bool = True,
    convention: str = "torch",
    maximize: bool = False,
    impl: str = "foreach",
) -> None:
    """One AdamW step for every parameter of a bucket; see the module docstring. ``params``
    are the weights (matrices, for projected parameters) updated in place; ``grads`` and
    the moments have the subspace's shape where a basis is given, the weight's otherwise."""
    body = {"reference": _reference, "foreach": _foreach, "fused": _fused}.get(impl)
    if body is None:
        raise ValueError(f"Invalid impl: {impl!r} (expected reference, foreach or fused)")
    if not params:
        return
    sides = sides if sides is not None else [None] * len(params)
    body(params, grads, bases, exp_avgs, exp_avg_sqs, state_steps, projector=projector,
         sides=sides, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
         scale=scale, correct_bias=correct_bias, galore=convention == "galore",
         maximize=maximize)


def _reference(params, grads, bases, exp_avgs, exp_avg_sqs, state_steps, *, projector, sides,
               lr, beta1, beta2, eps, weight_decay, scale, correct_bias, galore, maximize):
    convention = "galore" if galore else "torch"
    for w, g, basis, m, v, step, side in zip(params, grads, bases, exp_avgs, exp_avg_sqs,
                                              state_steps, sides, strict=True):
        if maximize:
            g = -g
        direction, factor = adamw_update(g, m, v, step, beta1=beta1, beta2=beta2, eps=eps,
                                         correct_bias=correct_bias, convention=convention)
        apply_reference(w, direction, basis, projector, side, scale, lr * factor,
                        lr * weight_decay, decay_after=galore)


def _fused_kernel_applies(tensors: Sequence[Tensor], correct_bias: bool,
                          *others: Sequence[Tensor]) -> bool:
    """Whether ``torch._fused_adamw_`` may take these tensors: it walks memory in order,
    so every one of them must be contiguous (on the CPU it silently skips the update of a
    strided parameter, as torch's own ``AdamW(fused=True)`` does)."""
    device = tensors[0].device
    return (correct_bias and device.type in ("cpu", "cuda")
            and not torch.compiler.is_compiling()
            and all(t.is_contiguous() for group in (tensors, *others) for t in group))


def _fused_moments(params: Sequence[Tensor], grads: Sequence[Tensor],
                   exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                   state_steps: Sequence[int], *, beta1: float, beta2: float, eps: float,
                   weight_decay: float, galore: bool, maximize: bool, lr: float = 1.0) -> None:
    """torch's multi-tensor fused AdamW on ``params``, one call per distinct step (galore's
    eps is torch's ``eps / sqrt(1 - b2^t)``, which depends on the step)."""
    device = grads[0].device
    first = state_steps[0]
    if all(step == first for step in state_steps):  # the usual case: no grouping to do
        groups = [(first, None)]
    else:
        by_step: dict[int, list[int]] = {}
        for i, step in enumerate(state_steps):
            by_step.setdefault(step, []).append(i)
        groups = list(by_step.items())
    for step, index in groups:
        eps_t = eps / math.sqrt(1 - beta2**step) if galore else eps
        if index is None:
            p, g, m, v = params, grads, exp_avgs, exp_avg_sqs
        else:
            p, g = [params[i] for i in index], [grads[i] for i in index]
            m, v = [exp_avgs[i] for i in index], [exp_avg_sqs[i] for i in index]
        steps = [torch.full((), float(step), device=device)] * len(p)
        torch._fused_adamw_(list(p), list(g), list(m), list(v), [], steps, lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps_t,
                            amsgrad=False, maximize=maximize)


def negated_directions(grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                       exp_avg_sqs: Sequence[Tensor], state_steps: Sequence[int], *,
                       beta1: float, beta2: float, eps: float, correct_bias: bool,
                       galore: bool, maximize: bool, overwrite: bool = False) -> list[Tensor]:
    """Update the moments in place and return ``-c N`` per parameter (see module docstring).

    ``overwrite``: the gradients are temporaries of this step (projections) and may hold
    the result. The fused kernel then takes each gradient as its own "parameter" with lr 1
    and weight decay 1, so that ``p - lr wd p - lr u = -u`` exactly: it reads the gradient
    before writing the same element, and no buffer is allocated or zeroed (a test checks
    the result equals the one with a separate zero buffer, bit for bit)."""
    if _fused_kernel_applies(grads, correct_bias, exp_avgs, exp_avg_sqs):
        if overwrite:
            dirs, decay = list(grads), 1.0
        else:  # zero buffers for the kernel's "parameters", in one op for the whole bucket
            dirs, decay = torch._foreach_mul(exp_avgs, 0.0), 0.0
        _fused_moments(dirs, grads, exp_avgs, exp_avg_sqs, state_steps, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=decay, galore=galore,
                       maximize=maximize)
        return dirs
    if maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bias1 = [1 - beta1**s if correct_bias else 1.0 for s in state_steps]
    root2 = [math.sqrt(1 - beta2**s) if correct_bias else 1.0 for s in state_steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    if galore:
        torch._foreach_add_(denom, eps)
        factors = [-r / b for r, b in zip(root2, bias1, strict=True)]
    else:
        torch._foreach_div_(denom, root2)
        torch._foreach_add_(denom, eps)
        factors = [-1 / b for b in bias1]
    dirs = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(dirs, factors)
    return dirs


def _foreach(params, grads, bases, exp_avgs, exp_avg_sqs, state_steps, *, projector, sides,
             lr, beta1, beta2, eps, weight_decay, scale, correct_bias, galore, maximize):
    same_dtype = all(w.dtype == g.dtype for w, g in zip(params, grads, strict=True))
    if bases[0] is None and same_dtype and not isinstance(lr, Tensor) and \
            _fused_kernel_applies(grads, correct_bias, params, exp_avgs, exp_avg_sqs):
        # Full rank: torch's own fused AdamW updates the weights in place (decay before the
        # update; galore's order decays after it, with the same numbers).
        decay = lr * weight_decay
        _fused_moments(params, grads, exp_avgs, exp_avg_sqs, state_steps, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=0.0 if galore else weight_decay,
                       galore=galore, maximize=maximize, lr=lr)
        if galore and decay != 0:
            torch._foreach_mul_(list(params), 1 - decay)
        return
    dirs = negated_directions(grads, exp_avgs, exp_avg_sqs, state_steps, beta1=beta1,
                              beta2=beta2, eps=eps, correct_bias=correct_bias, galore=galore,
                              maximize=maximize, overwrite=bases[0] is not None)
    alpha = lr * scale
    apply_folded(params, dirs, bases, projector, sides, [alpha] * len(params),
                 lr * weight_decay, decay_after=galore)


def _fused(params, grads, bases, exp_avgs, exp_avg_sqs, state_steps, *, projector, sides,
           lr, beta1, beta2, eps, weight_decay, scale, correct_bias, galore, maximize):
    lr = float(lr)  # the kernels take host scalars
    for w, g, basis, m, v, step, side in zip(params, grads, bases, exp_avgs, exp_avg_sqs,
                                              state_steps, sides, strict=True):
        if basis is None or isinstance(basis, Tensor):  # full rank, or a dense basis
            ops.projected_adamw_update(w, g, basis, m, v, step, lr, beta1, beta2, eps,
                                       weight_decay, scale, side != Side.LEFT, galore,
                                       correct_bias, maximize)
        else:  # the projector's own kernels apply a packed, sparse or generated basis
            _reference([w], [g], [basis], [m], [v], [step], projector=projector, sides=[side],
                       lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       scale=scale, correct_bias=correct_bias, galore=galore,
                       maximize=maximize)
