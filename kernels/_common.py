"""Pieces every kernel shares: the interpreter switch, autotune configurations, and the
counter-based hash of ``subspace_optim.counter_rng`` in Triton's native 32-bit integers.

Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, what CI runs) autotuning with more
than one configuration fails, and ``tl.dot`` on bf16 operands returns garbage (it multiplies
the raw bits), so kernels take one configuration and upcast dot operands to fp32 there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Triton's interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest even), which
# doubles the rounding error; kernels cast their bf16 outputs through ``cast_out``.
EMULATE_BF16_ROUNDING: tl.constexpr = tl.constexpr(INTERPRET)


def configs(tuned: list[triton.Config], interpreted: triton.Config) -> list[triton.Config]:
    """The autotune list: ``tuned`` on a GPU, the single ``interpreted`` one under the
    interpreter (larger blocks: each program instance costs about 0.7 ms there)."""
    return [interpreted] if INTERPRET else tuned


def dot_dtype(*tensors: torch.Tensor) -> tl.dtype:
    """The dtype dot operands are cast to: fp32 under the interpreter or when any operand is
    fp32 (then TF32 on tensor cores, as torch's default for kernels), else the operands'
    reduced dtype (bf16 or fp16 tensor cores, fp32 accumulation)."""
    if INTERPRET or any(t.dtype == torch.float32 for t in tensors):
        return tl.float32
    return tl.bfloat16 if any(t.dtype == torch.bfloat16 for t in tensors) else tl.float16


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """``x`` (fp32) in the output dtype, rounded to nearest even also under the
    interpreter (for bf16: add half an ulp, plus one on ties to odd, then truncate)."""
    if EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


# lowbias32 and the stream constants of subspace_optim.counter_rng.
MUL1, MUL2 = 0x7FEB352D, 0x846CA68B
GOLDEN, STREAM2 = 0x9E3779B9, 0xBB67AE85


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (multiplication wraps modulo 2**32, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def hash_bits(key, counter):
    """32 random bits for each int64 ``counter`` under the uint32 ``key``."""
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    x = mix32(lo ^ key)
    return mix32(x ^ hi ^ tl.full(x.shape, 0x9E3779B9, tl.uint32))


@triton.jit
def to_uniform(bits):
    """float32 in (0, 1) from the top 24 bits."""
    return ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def gaussian(key, counter):
    """Standard normals by Box-Muller, as ``counter_rng.gaussian``."""
    h1 = hash_bits(key, counter)
    h2 = mix32(h1 ^ tl.full(h1.shape, 0xBB67AE85, tl.uint32))
    u1 = to_uniform(h1)
    u2 = to_uniform(h2)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


def key32(seed: torch.Tensor | int, stream: int = 0) -> int:
    """The 32-bit key of (seed, stream), computed on the host (a 0-d CPU tensor's value:
    no device read)."""
    from subspace_optim import counter_rng

    return int(counter_rng.key(seed, stream))
