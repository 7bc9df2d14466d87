"""Triton implementations of the INT4-basis ops: projection and back-projection straight
from Q-GaLore's packed basis (two 4-bit codes per byte, or 8-bit codes, a float32 scale and
a uint8 zero-point per group of consecutive elements), dequantised in registers inside the
matrix product (``gemm.py``, operand kind "packed"): the float basis is never stored.

Stored basis ``r x n`` (right side) or ``m x r`` (left), row-major flat index:
``int4_project``: ``R = G B^T`` (right, ``m x r``) or ``B^T G`` (left, ``r x n``);
``int4_project_back_``: ``W <- beta W + alpha (N B)`` (right) or ``(B N)`` (left).
"""

from __future__ import annotations

import torch

from subspace_optim import ops

from . import gemm


@ops.register_triton("int4_project")
def int4_project(grad, codes, scales, zeros, rank, right, bits, group_size):
    m, n = grad.shape
    if right:  # (m x n) @ (n x r): the basis r x n, transposed
        out = torch.empty((m, rank), device=grad.device, dtype=grad.dtype)
        basis = gemm.packed(codes, scales, zeros, n, bits, group_size, transposed=True)
        return gemm.matmul(gemm.dense(grad), basis, m, rank, n, out)
    out = torch.empty((rank, n), device=grad.device, dtype=grad.dtype)
    basis = gemm.packed(codes, scales, zeros, rank, bits, group_size, transposed=True)
    return gemm.matmul(basis, gemm.dense(grad), rank, n, m, out)  # (r x m) @ (m x n)


@ops.register_triton("int4_project_back_")
def int4_project_back_(weight, low, codes, scales, zeros, right, bits, group_size, dtype,
                       alpha, beta):
    m, n = weight.shape
    if right:  # W += N (m x r) @ B (r x n)
        rank = low.shape[1]
        basis = gemm.packed(codes, scales, zeros, n, bits, group_size, transposed=False)
        gemm.matmul(gemm.dense(low), basis, m, n, rank, weight, alpha=alpha, beta=beta,
                    update=True)
    else:  # W += B (m x r) @ N (r x n)
        rank = low.shape[0]
        basis = gemm.packed(codes, scales, zeros, rank, bits, group_size, transposed=False)
        gemm.matmul(basis, gemm.dense(low), m, n, rank, weight, alpha=alpha, beta=beta,
                    update=True)
