"""Triton implementations of Flora's ops, with the projection matrix generated tile by
tile inside the matrix product (``gemm.py``, operand kind "flora") and never stored:
element ``(i, j)`` of the basis (``m x r`` on the left, ``r x n`` on the right) is
``gaussian(key(seed), i * cols + j) / sqrt(r)``, the same counter-based hash as the PyTorch
implementation (``subspace_optim.counter_rng``), in native 32-bit integers.

``flora_project``: ``R = G B^T`` (right) or ``B^T G`` (left); ``flora_project_back_``:
``W <- beta W + alpha (N B)`` or ``(B N)``; ``flora_matrix``: the basis itself, generated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from subspace_optim import ops

from . import gemm
from ._common import INTERPRET, cast_out, gaussian, key32, offsets


@ops.register_triton("flora_project")
def flora_project(grad, seed, rank, right):
    m, n = grad.shape
    key = key32(seed)
    if right:  # (m x n) @ (n x r): the basis r x n, transposed
        out = torch.empty((m, rank), device=grad.device, dtype=grad.dtype)
        basis = gemm.flora(key, n, rank, transposed=True, like=grad)
        return gemm.matmul(gemm.dense(grad), basis, m, rank, n, out)
    out = torch.empty((rank, n), device=grad.device, dtype=grad.dtype)
    basis = gemm.flora(key, rank, rank, transposed=True, like=grad)
    return gemm.matmul(basis, gemm.dense(grad), rank, n, m, out)


@ops.register_triton("flora_project_back_")
def flora_project_back_(weight, low, seed, right, alpha, beta):
    m, n = weight.shape
    key = key32(seed)
    if right:
        rank = low.shape[1]
        basis = gemm.flora(key, n, rank, transposed=False, like=weight)
        gemm.matmul(gemm.dense(low), basis, m, n, rank, weight, alpha=alpha, beta=beta,
                    update=True)
    else:
        rank = low.shape[0]
        basis = gemm.flora(key, rank, rank, transposed=False, like=weight)
        gemm.matmul(basis, gemm.dense(low), m, n, rank, weight, alpha=alpha, beta=beta,
                    update=True)


@triton.jit(do_not_specialize=["key"])
def _flora_matrix_kernel(out_ptr, n, key, sqrt_rank, BLOCK: tl.constexpr):
    offs = offsets(tl.program_id(0), BLOCK)
    z = gaussian(key.to(tl.uint32), offs) / sqrt_rank
    tl.store(out_ptr + offs, cast_out(z, out_ptr.dtype.element_ty), mask=offs < n)


@ops.register_triton("flora_matrix")
def flora_matrix(seed, like, rows, cols, rank):
    out = torch.empty((rows, cols), device=like.device, dtype=like.dtype)
    n = rows * cols
    # Box-Muller per element: 256 per program (2 per thread) spills on none of sm_80/89/90;
    # 512 to 4096 spilled 4-8 bytes on sm_80 or sm_89 (benchmarks/aot_compile.py).
    block = 4096 if INTERPRET else 256
    _flora_matrix_kernel[(triton.cdiv(n, block),)](out, n, key32(seed), float(rank) ** 0.5,
                                                   BLOCK=block)
    return out
