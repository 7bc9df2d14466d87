"""Ops: Grass's structured sparse projection, a gather of rows (columns) and a scatter-add.

The projection keeps ``rank`` rows (left side: rows of ``G``; right side: columns) at
``indices`` (int32 or int64, sorted), each scaled by ``scales`` (float32):
``grass_gather``: ``R = rho * G[idx, :]`` (left, ``r x n``) or ``rho * G[:, idx]`` (right).
``grass_scatter_update_``: ``W <- beta W``, then ``W[idx] += alpha * rho * N`` (the
transpose of the gather), in the weight's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import define


@define("grass_gather")
def grass_gather(grad: Tensor, indices: Tensor, scales: Tensor, right: bool) -> Tensor:
    if right:
        return grad.index_select(1, indices) * scales.to(grad.dtype)[None, :]
    return grad.index_select(0, indices) * scales.to(grad.dtype)[:, None]


@grass_gather.op.register_fake
def _(grad, indices, scales, right):
    torch._check(indices.dtype in (torch.int32, torch.int64), lambda: "indices: int32 or int64")
    torch._check(indices.shape == scales.shape, lambda: "one scale per index")
    m, n = grad.shape
    return grad.new_empty((m, indices.numel()) if right else (indices.numel(), n))


@define("grass_scatter_update_", mutates_args=("weight",))
def grass_scatter_update_(weight: Tensor, low: Tensor, indices: Tensor, scales: Tensor,
                          right: bool, alpha: float, beta: float) -> None:
    if beta != 1.0:
        weight.mul_(beta)
    if right:
        rows = (low * scales.to(low.dtype)[None, :]).to(weight.dtype)
        weight.index_add_(1, indices, rows, alpha=alpha)
    else:
        rows = (low * scales.to(low.dtype)[:, None]).to(weight.dtype)
        weight.index_add_(0, indices, rows, alpha=alpha)


@grass_scatter_update_.op.register_fake
def _(weight, low, indices, scales, right, alpha, beta):
    torch._check(indices.shape == scales.shape, lambda: "one scale per index")
