"""One matrix-product kernel for every projection: ``C = A @ B`` or, with an update
epilogue, ``C <- beta C + alpha (A @ B)`` (the weight update of a back-projection, decay in
``beta``: no full-size temporary, the weight read and written once).

Either operand can be

* dense: a strided tensor (any layout: LAPACK's column-major bases need no copy);
* packed: a group-quantised basis (Q-GaLore's INT4, two codes per byte, low nibble first,
  or 8-bit codes), dequantised in registers as ``scale[g] * (code - zero[g])`` with ``g``
  the element's flat index in the stored basis over the group size; the float basis is
  never materialised;
* flora: Flora's Gaussian basis, generated in registers from its counter-based hash of
  the element's flat index (``gaussian(key, i * cols + j) / sqrt(rank)``); never stored.

A packed or generated operand is the stored basis (``rows x cols``, row-major flat index)
or its transpose (``transposed``). Shapes: A is ``M x K``, B ``K x N``, C ``M x N``; any
sizes (masked tiles), K as small as 1. Accumulation in fp32; dot operands in fp32 under the
interpreter or when an operand is fp32, else in the dense operands' bf16/fp16. Limits: one
device, C contiguous or strided, flat indices below 2**63.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import cast_out, configs, dot_dtype, gaussian

DENSE, PACKED, FLORA = 0, 1, 2

_TUNED = [
    triton.Config({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 64, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
_INTERPRETED = triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 1}, num_warps=4)


@triton.jit
def _tile(KIND: tl.constexpr, TRANSPOSED: tl.constexpr, BITS: tl.constexpr, ptr, s0, s1,
          scales, zeros, basis_cols, group, key, sqrt_rank, rows, cols, ri, ci):
    """The ``(ri, ci)`` tile of an operand of ``rows x cols``, in fp32 (zero outside)."""
    mask = (ri[:, None] < rows) & (ci[None, :] < cols)
    if KIND == 0:
        x = tl.load(ptr + ri[:, None] * s0 + ci[None, :] * s1, mask=mask, other=0.0)
        x = x.to(tl.float32)
    else:
        if TRANSPOSED:
            flat = ci[None, :].to(tl.int64) * basis_cols + ri[:, None]
        else:
            flat = ri[:, None].to(tl.int64) * basis_cols + ci[None, :]
        if KIND == 1:
            if BITS == 4:
                byte = tl.load(ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
                q = (byte >> ((flat & 1) * 4).to(tl.int32)) & 0xF
            else:
                q = tl.load(ptr + flat, mask=mask, other=0).to(tl.int32)
            g = flat // group
            s = tl.load(scales + g, mask=mask, other=0.0)
            z = tl.load(zeros + g, mask=mask, other=0).to(tl.int32)
            x = (q - z).to(tl.float32) * s
        else:
            x = gaussian(key.to(tl.uint32), flat) / sqrt_rank
            x = tl.where(mask, x, 0.0)
    return x


@triton.autotune(configs=configs(_TUNED, _INTERPRETED), key=["M", "N", "K"])
@triton.jit
def _gemm_kernel(
    c_ptr, stride_cm, stride_cn,
    a_ptr, a_s0, a_s1, a_scales, a_zeros, a_cols, a_group, a_key, a_sqrt_rank,
    b_ptr, b_s0, b_s1, b_scales, b_zeros, b_cols, b_group, b_key, b_sqrt_rank,
    M, N, K, alpha, beta,
    A_KIND: tl.constexpr, A_T: tl.constexpr, A_BITS: tl.constexpr,
    B_KIND: tl.constexpr, B_T: tl.constexpr, B_BITS: tl.constexpr,
    UPDATE: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering of the output tiles, so that consecutive programs share A's rows.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        a = _tile(A_KIND, A_T, A_BITS, a_ptr, a_s0, a_s1, a_scales, a_zeros, a_cols, a_group,
                  a_key, a_sqrt_rank, M, K, rm, rk)
        b = _tile(B_KIND, B_T, B_BITS, b_ptr, b_s0, b_s1, b_scales, b_zeros, b_cols, b_group,
                  b_key, b_sqrt_rank, K, N, rk, rn)
        acc += tl.dot(a.to(DOT), b.to(DOT))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    if UPDATE:
        old = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        acc = beta * old + alpha * acc
    tl.store(c_ptrs, cast_out(acc, c_ptr.dtype.element_ty), mask=mask)


class Operand(NamedTuple):
    """What ``_gemm_kernel`` needs of one operand (see the module docstring)."""

    kind: int
    ptr: torch.Tensor
    strides: tuple[int, int] = (0, 0)
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    basis_cols: int = 1
    group: int = 1
    key: int = 0
    sqrt_rank: float = 1.0
    transposed: bool = False
    bits: int = 8


def dense(t: torch.Tensor) -> Operand:
    return Operand(DENSE, t, (t.stride(0), t.stride(1)))


def packed(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, basis_cols: int,
           bits: int, group: int, transposed: bool) -> Operand:
    return Operand(PACKED, codes, scales=scales, zeros=zeros, basis_cols=basis_cols,
                   group=group, transposed=transposed, bits=bits)


def flora(key: int, basis_cols: int, rank: int, transposed: bool, like: torch.Tensor) -> Operand:
    return Operand(FLORA, like, basis_cols=basis_cols, key=key, sqrt_rank=math.sqrt(rank),
                   transposed=transposed)


def matmul(a: Operand, b: Operand, m: int, n: int, k: int, out: torch.Tensor, *,
           alpha: float = 1.0, beta: float = 0.0, update: bool = False) -> torch.Tensor:
    """``out = a @ b`` (``update=False``) or ``out <- beta out + alpha (a @ b)``."""
    dense_operands = [x.ptr for x in (a, b) if x.kind == DENSE] or [out]
    dot = dot_dtype(*dense_operands)

    def args(x: Operand):
        filler = x.ptr
        return (x.ptr, *x.strides, x.scales if x.scales is not None else filler,
                x.zeros if x.zeros is not None else filler, x.basis_cols, x.group, x.key,
                x.sqrt_rank)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    _gemm_kernel[grid](out, out.stride(0), out.stride(1), *args(a), *args(b), m, n, k,
                       float(alpha), float(beta), A_KIND=a.kind, A_T=a.transposed,
                       A_BITS=a.bits, B_KIND=b.kind, B_T=b.transposed, B_BITS=b.bits,
                       UPDATE=update, DOT=dot)
    return out
