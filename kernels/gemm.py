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
device, C contiguous or strided, flat indices below 2**63 (offsets are 64-bit: a tensor may
have 2**31 elements or more).

Tuning (``_common.autotune``): keyed on the sizes and on everything that changes the
kernel's resources (operand kinds, bit widths, transposition, the update flag, the dot dtype
and precision); C is restored after each timed launch (the update epilogue writes it in
place); configurations whose shared memory exceeds the device's are pruned before timing
(:func:`shared_memory_bytes`, an upper bound checked against the compiled kernels by
``benchmarks/aot_compile.py``), and the smallest always fits a consumer GPU (99 KiB). fp32
operands multiply in IEEE fp32 unless the user allowed TF32 for matmuls (PyTorch's rule,
``_common.fp32_precision``), on the FMA units with their own configurations.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (
    autotune,
    capability,
    cast_out,
    dot,
    dot_dtype,
    fp32_precision,
    gaussian,
    shared_memory_limit,
)

DENSE, PACKED, FLORA = 0, 1, 2

# Configurations, measured with benchmarks/aot_compile.py for sm_80/89/90. Tensor cores
# (bf16/fp16 operands, or fp32 with TF32 allowed): K tiles of 32, where the packed and
# generated operands' dequantisation in registers does not spill (K tiles of 64 spilled up
# to 22 KB per thread).
_TENSOR_CORES = [
    triton.Config({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 128, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    # The smallest: fits every target's shared memory (48 KiB with dense fp32 operands).
    triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
# IEEE fp32 (PyTorch's default for fp32 matmuls) has no tensor-core instruction: Triton
# multiplies on the FMA units, whose operand layout holds more in registers, so K tiles of
# 16 over 8 warps (K tiles of 32 over 4 warps spilled in every configuration on sm_80).
_FMA = [
    triton.Config({"BM": 128, "BN": 64, "BK": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 64, "BK": 16, "GROUP_M": 8}, num_warps=8, num_stages=3),
]
_TUNED = _TENSOR_CORES + _FMA
# Two under the interpreter (see _common.autotune), of different tile shapes.
_INTERPRETED = [
    triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 1}, num_warps=4),
    triton.Config({"BM": 128, "BN": 32, "BK": 64, "GROUP_M": 2}, num_warps=4),
]
_KEY = ["M", "N", "K", "A_KIND", "A_T", "A_BITS", "B_KIND", "B_T", "B_BITS", "FLAT64", "UPDATE",
        "DOT", "PRECISION"]
_BYTES = {tl.float32: 4, tl.bfloat16: 2, tl.float16: 2}
# What a packed operand loads per element and pipeline stage: its code (one byte, also for
# 4 bits), its group's float32 scale and uint8 zero-point.
_PACKED_LOAD_BYTES = 1 + 4 + 1


def shared_memory_bytes(config: triton.Config, a_kind: int, a_bytes: int, b_kind: int,
                        b_bytes: int, dot_bytes: int, cc: tuple[int, int]) -> int:
    """An upper bound on the shared memory of ``config`` (checked against every compiled
    specialisation by ``benchmarks/aot_compile.py``): a dense operand's tile is staged in
    its own dtype, or the dot dtype where that is wider, once per pipeline stage
    (``num_stages`` buffers from sm_90, one fewer before); a packed one stages its loads
    per stage and the dequantised tile once in the dot dtype; a generated one only the
    latter. The epilogue's layout change of the fp32 accumulator reuses the same memory."""
    bm, bn, bk = config.kwargs["BM"], config.kwargs["BN"], config.kwargs["BK"]
    stages = config.num_stages if cc >= (9, 0) else max(config.num_stages - 1, 1)

    def tile(kind, size, elements):
        if kind == DENSE:  # staged in the dot dtype when that is wider (bf16 next to fp32)
            return elements * max(size, dot_bytes) * stages
        loads = _PACKED_LOAD_BYTES * stages if kind == PACKED else 0
        return elements * (loads + dot_bytes)

    return max(tile(a_kind, a_bytes, bm * bk) + tile(b_kind, b_bytes, bk * bn), bm * bn * 4)


def _prune(configs, named_args, **kwargs):
    """The configurations of the kernel's kind of product (FMA for IEEE fp32, tensor cores
    otherwise; under the interpreter all) that fit the device's shared memory (the
    smallest if none does)."""
    fma = kwargs["DOT"] == tl.float32 and kwargs["PRECISION"] == "ieee"
    kind = [c for c in configs if any(c is t for t in (_FMA if fma else _TENSOR_CORES))]
    configs = kind or configs
    device = named_args["c_ptr"].device
    limit, cc = shared_memory_limit(device), capability(device)
    dot_bytes = _BYTES[kwargs["DOT"]]

    def size(name, kind):
        return named_args[name].element_size() if kind == DENSE else dot_bytes

    def need(config):
        return shared_memory_bytes(config, kwargs["A_KIND"], size("a_ptr", kwargs["A_KIND"]),
                                   kwargs["B_KIND"], size("b_ptr", kwargs["B_KIND"]),
                                   dot_bytes, cc)

    fitting = [c for c in configs if need(c) <= limit]
    return fitting or [min(configs, key=need)]


@triton.jit
def _generated(KIND: tl.constexpr, TRANSPOSED: tl.constexpr, BITS: tl.constexpr,
               FLAT64: tl.constexpr, ptr, scales, zeros, basis_cols, group, key, sqrt_rank,
               rows, cols, ri, ci):
    """The ``(ri, ci)`` tile of a packed or generated operand of ``rows x cols``, in fp32
    (zero outside). Flat indices in int32 unless the basis has 2**31 elements or more
    (``FLAT64``): a 64-bit index per element doubles the registers of the dequantisation."""
    mask = (ri[:, None] < rows) & (ci[None, :] < cols)
    if FLAT64:
        ri = ri.to(tl.int64)
        ci = ci.to(tl.int64)
    if TRANSPOSED:
        flat = ci[None, :] * basis_cols + ri[:, None]
    else:
        flat = ri[:, None] * basis_cols + ci[None, :]
    if KIND == 1:
        if BITS == 4:
            byte = tl.load(ptr + (flat >> 1).to(tl.int64), mask=mask, other=0).to(tl.int32)
            q = (byte >> ((flat & 1) * 4).to(tl.int32)) & 0xF
        else:
            q = tl.load(ptr + flat.to(tl.int64), mask=mask, other=0).to(tl.int32)
        g = (flat // group).to(tl.int64)
        s = tl.load(scales + g, mask=mask, other=0.0)
        z = tl.load(zeros + g, mask=mask, other=0).to(tl.int32)
        x = (q - z).to(tl.float32) * s
    else:
        x = gaussian(key.to(tl.uint32), flat.to(tl.int64)) / sqrt_rank
        x = tl.where(mask, x, 0.0)
    return x


@autotune(_TUNED, _INTERPRETED, key=_KEY, restore_value=["c_ptr"], prune=_prune)
@triton.jit(do_not_specialize=["a_key", "b_key"])
def _gemm_kernel(
    c_ptr, stride_cm, stride_cn,
    a_ptr, a_s0, a_s1, a_scales, a_zeros, a_cols, a_group, a_key, a_sqrt_rank,
    b_ptr, b_s0, b_s1, b_scales, b_zeros, b_cols, b_group, b_key, b_sqrt_rank,
    M, N, K, alpha, beta,
    A_KIND: tl.constexpr, A_T: tl.constexpr, A_BITS: tl.constexpr,
    B_KIND: tl.constexpr, B_T: tl.constexpr, B_BITS: tl.constexpr, FLAT64: tl.constexpr,
    UPDATE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
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
    rk0 = tl.arange(0, BK)
    # Dense operands: 64-bit pointers of the first K tile, advanced by BK each iteration.
    if A_KIND == 0:
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * a_s0 + rk0[None, :].to(tl.int64) * a_s1
    if B_KIND == 0:
        b_ptrs = b_ptr + rk0[:, None].to(tl.int64) * b_s0 + rn[None, :].to(tl.int64) * b_s1
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + rk0
        if A_KIND == 0:
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            a_ptrs += tl.full((), BK, tl.int64) * a_s1
        else:
            a = _generated(A_KIND, A_T, A_BITS, FLAT64, a_ptr, a_scales, a_zeros, a_cols,
                           a_group, a_key, a_sqrt_rank, M, K, rm, rk)
        if B_KIND == 0:
            b = tl.load(b_ptrs, mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
            b_ptrs += tl.full((), BK, tl.int64) * b_s0
        else:
            b = _generated(B_KIND, B_T, B_BITS, FLAT64, b_ptr, b_scales, b_zeros, b_cols,
                           b_group, b_key, b_sqrt_rank, K, N, rk, rn)
        acc += dot(a, b, DOT, PRECISION)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn
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
    dot_type = dot_dtype(*dense_operands)

    def args(x: Operand):
        filler = x.ptr
        return (x.ptr, *x.strides, x.scales if x.scales is not None else filler,
                x.zeros if x.zeros is not None else filler, x.basis_cols, x.group, x.key,
                x.sqrt_rank)

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    # A basis of 2**31 elements or more needs 64-bit flat indices (dense operands always
    # address in 64 bits).
    flat64 = any(x.kind != DENSE and (m * k if x is a else k * n) >= 2**31 for x in (a, b))
    _gemm_kernel[grid](out, out.stride(0), out.stride(1), *args(a), *args(b), m, n, k,
                       float(alpha), float(beta), A_KIND=a.kind, A_T=a.transposed,
                       A_BITS=a.bits, B_KIND=b.kind, B_T=b.transposed, B_BITS=b.bits,
                       FLAT64=flat64,
                       UPDATE=update, DOT=dot_type, PRECISION=fp32_precision())
    return out
