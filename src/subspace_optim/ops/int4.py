"""Ops: projection and back-projection with a group-quantised basis (Q-GaLore's INT4).

The basis (``r x n`` on the right, ``m x r`` on the left) is stored flat as codes (4-bit
packed two per byte, or 8-bit), a float32 scale and a uint8 zero-point per group of
``group_size`` consecutive elements; its value is ``scale * (code - zero)``
(``subspace_optim.quant.groupwise``). The PyTorch implementation dequantises it, casts it
to ``dtype`` (the gradient's dtype, as Q-GaLore keeps its basis) and multiplies; a kernel
dequantises in registers and never materialises the float basis.

``int4_project``: ``R = G B^T`` (right) or ``B^T G`` (left).
``int4_project_back_``: ``W <- beta W + alpha back(N)``, back ``N B`` or ``B N``, in the
weight's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.groupwise import dequantize_groupwise
from . import define


def dequantized_basis(codes: Tensor, scales: Tensor, zeros: Tensor, rows: int, cols: int,
                      bits: int, group_size: int, dtype: torch.dtype) -> Tensor:
    flat = dequantize_groupwise(codes, scales, zeros, rows * cols, bits, group_size)
    return flat.view(rows, cols).to(dtype)


def basis_shape(m: int, n: int, rank: int, right: bool) -> tuple[int, int]:
    return (rank, n) if right else (m, rank)


@define("int4_project")
def int4_project(grad: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, rank: int,
                 right: bool, bits: int, group_size: int) -> Tensor:
    m, n = grad.shape
    basis = dequantized_basis(codes, scales, zeros, *basis_shape(m, n, rank, right), bits,
                              group_size, grad.dtype)
    return grad @ basis.T if right else basis.T @ grad


@int4_project.op.register_fake
def _(grad, codes, scales, zeros, rank, right, bits, group_size):
    torch._check(codes.dtype == torch.uint8, lambda: "codes must be uint8")
    torch._check(bits in (4, 8), lambda: f"bits must be 4 or 8, got {bits}")
    m, n = grad.shape
    return grad.new_empty((m, rank) if right else (rank, n))


@define("int4_project_back_", mutates_args=("weight",))
def int4_project_back_(weight: Tensor, low: Tensor, codes: Tensor, scales: Tensor,
                       zeros: Tensor, right: bool, bits: int, group_size: int,
                       dtype: torch.dtype, alpha: float, beta: float) -> None:
    m, n = weight.shape
    rank = low.shape[1] if right else low.shape[0]
    basis = dequantized_basis(codes, scales, zeros, *basis_shape(m, n, rank, right), bits,
                              group_size, dtype).to(weight.dtype)
    low = low.to(weight.dtype)
    if right:
        weight.addmm_(low, basis, beta=beta, alpha=alpha)
    else:
        weight.addmm_(basis, low, beta=beta, alpha=alpha)


@int4_project_back_.op.register_fake
def _(weight, low, codes, scales, zeros, right, bits, group_size, dtype, alpha, beta):
    torch._check(weight.dim() == 2 and low.dim() == 2, lambda: "weight and low are matrices")
    torch._check(low.shape[0] == weight.shape[0] if right else low.shape[1] == weight.shape[1],
                 lambda: f"low {tuple(low.shape)} does not fit weight {tuple(weight.shape)}")
