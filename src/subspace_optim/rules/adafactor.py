"""Adafactor's pieces as pure functions on tensors (Shazeer & Stern 2018, with the
semantics of transformers' ``Adafactor``, which Flora and galore-torch build on)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rms(x: Tensor) -> Tensor:
    """Root mean square as a 0-d tensor (no host sync)."""
    return x.norm(2) / math.sqrt(max(x.numel(), 1))


def decay_beta2(step: int, decay_rate: float) -> float:
    """Adafactor's increasing second-moment decay ``1 - t^decay_rate`` (t 1-based). Inside
    ``torch.compile``, where the step is a symbolic int, as ``t ** decay_rate`` (the same
    C ``pow``), which the compiler traces; ``math.pow`` would specialise the graph on every
    step's value and recompile each step."""
    if torch.compiler.is_compiling():
        return 1.0 - step**decay_rate
    return 1.0 - math.pow(step, decay_rate)


def relative_step_size(
    lr: float | None, step: int, relative_step: bool, warmup_init: bool
) -> float:
    """The schedule-free step size of ``relative_step=True``, else ``lr`` (inside
    ``torch.compile`` as a 0-d tensor, so that the minimum is not a guard on the step)."""
    if not relative_step:
        return lr
    if torch.compiler.is_compiling():
        # A tensor times the symbolic step: traced, where a tensor made from it would be
        # specialised on its value.
        t = torch.ones((), dtype=torch.float64) * step
        return torch.minimum(t * 1e-6 if warmup_init else torch.full_like(t, 1e-2),
                             t.rsqrt())
    min_step = 1e-6 * step if warmup_init else 1e-2
    return min(min_step, 1.0 / math.sqrt(step))


def factored_preconditioned(
    grad: Tensor, row: Tensor, col: Tensor, beta2: float, eps: float
) -> Tensor:
    """Update the row and column EMAs of ``grad^2 + eps`` in place and return
    ``grad / sqrt(v_hat)`` with ``v_hat = row col^T / mean(row)`` (the factored estimate)."""
    sq = grad.square().add_(eps)
    row.mul_(beta2).add_(sq.mean(dim=-1), alpha=1 - beta2)
    col.mul_(beta2).add_(sq.mean(dim=-2), alpha=1 - beta2)
    row_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    col_factor = col.unsqueeze(-2).rsqrt()
    return row_factor * col_factor * grad


def full_preconditioned(grad: Tensor, exp_avg_sq: Tensor, beta2: float, eps: float) -> Tensor:
    """Unfactored: ``v <- beta2 v + (1 - beta2)(grad^2 + eps)``; returns ``grad / sqrt(v)``."""
    exp_avg_sq.mul_(beta2).add_(grad.square().add_(eps), alpha=1 - beta2)
    return exp_avg_sq.rsqrt() * grad


def clip_by_rms_(update: Tensor, threshold: float) -> Tensor:
    """Scale ``update`` down in place so that its RMS is at most ``threshold``."""
    return update.div_((rms(update) / threshold).clamp_(min=1.0))


def adafactor_update(
    grad: Tensor,
    moments: dict[str, Tensor],
    step: int,
    *,
    lr: float | Tensor,
    beta1: float | None,
    decay_rate: float,
    eps: float,
    clip_threshold: float,
) -> Tensor:
    """One Adafactor step on ``grad`` (transformers' and galore-torch's order): precondition
    by the factored (``exp_avg_sq_row``/``exp_avg_sq_col``) or full (``exp_avg_sq``) second
    moment, clip by RMS, scale by ``lr``, then, with ``beta1``, average into ``exp_avg``.
    Updates ``moments`` in place; returns the lr-scaled update (the step is ``p -= update``)."""
    beta2 = decay_beta2(step, decay_rate)
    if "exp_avg_sq_row" in moments:
        update = factored_preconditioned(
            grad, moments["exp_avg_sq_row"], moments["exp_avg_sq_col"], beta2, eps
        )
    else:
        update = full_preconditioned(grad, moments["exp_avg_sq"], beta2, eps)
    clip_by_rms_(update, clip_threshold)
    update.mul_(lr)
    if beta1:
        update = moments["exp_avg"].mul_(beta1).add_(update, alpha=1 - beta1)
    return update
