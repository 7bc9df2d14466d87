"""Ops: projection and back-projection with Flora's seeded Gaussian matrix, which is never
stored. The dense basis (``m x r`` on the left, ``r x n`` on the right) has entries
``gaussian(key(seed), i * cols + j) / sqrt(r)`` (``subspace_optim.counter_rng``); the
PyTorch implementation generates it whole, a kernel generates it tile by tile inside the
matrix product.

``flora_project``: ``R = G B^T`` (right) or ``B^T G`` (left), with ``B`` in the gradient's
dtype. ``flora_project_back_``: ``W <- beta W + alpha back(N)`` (``N B`` or ``B N``) in the
weight's dtype. ``seed``: a 0-d int64 tensor (CPU), read as a scalar: no device copy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import counter_rng
from . import define


@define("flora_matrix", device_arg=1, opaque=True)
def flora_matrix(seed: Tensor, like: Tensor, rows: int, cols: int, rank: int) -> Tensor:
    """The ``rows x cols`` basis (normals over ``sqrt(rank)``) for ``seed``, on ``like``'s
    device and in its dtype (``like`` is an empty tensor that carries both)."""
    z = counter_rng.gaussian_matrix(seed, (rows, cols), like.device)
    return (z / math.sqrt(rank)).to(like.dtype)


@flora_matrix.op.register_fake
def _(seed, like, rows, cols, rank):
    return like.new_empty((rows, cols))


def flora_basis(seed: Tensor | int, shape: tuple[int, int], rank: int, right: bool,
                device: torch.device, dtype: torch.dtype) -> Tensor:
    """The projection for ``seed`` as a dense basis (``m x r`` left, ``r x n`` right)."""
    m, n = shape
    rows, cols = (rank, n) if right else (m, rank)
    seed = torch.as_tensor(seed, dtype=torch.int64)
    return flora_matrix(seed, torch.empty(0, device=device, dtype=dtype), rows, cols, rank)


@define("flora_project")
def flora_project(grad: Tensor, seed: Tensor, rank: int, right: bool) -> Tensor:
    basis = flora_basis(seed, tuple(grad.shape), rank, right, grad.device, grad.dtype)
    return grad @ basis.T if right else basis.T @ grad


@flora_project.op.register_fake
def _(grad, seed, rank, right):
    torch._check(seed.dtype == torch.int64 and seed.dim() == 0, lambda: "seed: 0-d int64")
    m, n = grad.shape
    return grad.new_empty((m, rank) if right else (rank, n))


@define("flora_project_back_", mutates_args=("weight",))
def flora_project_back_(weight: Tensor, low: Tensor, seed: Tensor, right: bool,
                        alpha: float, beta: float) -> None:
    rank = low.shape[1] if right else low.shape[0]
    basis = flora_basis(seed, tuple(weight.shape), rank, right, weight.device, weight.dtype)
    low = low.to(weight.dtype)
    if right:
        weight.addmm_(low, basis, beta=beta, alpha=alpha)
    else:
        weight.addmm_(basis, low, beta=beta, alpha=alpha)


@flora_project_back_.op.register_fake
def _(weight, low, seed, right, alpha, beta):
    torch._check(seed.dtype == torch.int64 and seed.dim() == 0, lambda: "seed: 0-d int64")
