"""Pieces every kernel shares: the interpreter switch, autotuning that is safe for kernels
that update a tensor in place, the fp32 product precision, and the counter-based hash of
``subspace_optim.counter_rng`` in Triton's native 32-bit integers.

Autotuning. On a GPU, Triton times every configuration by launching the kernel many times
(``triton.testing.do_bench``). A kernel that updates a tensor in place (the weight update in
the GEMM's epilogue) would apply the update once per timed launch, so :func:`autotune`
requires the names of such tensors (``restore_value``): Triton copies them before the timing
and restores them after. Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, what CI
runs) the same autotuner runs over two configurations with a stand-in for the timing that
launches each of them :data:`BENCH_LAUNCHES` times, so a tensor left unrestored fails the
kernel tests on the CPU as it would corrupt weights on a GPU.

Precision of fp32 products. ``tl.dot`` on fp32 operands compiles to TF32 tensor-core
instructions unless told otherwise; PyTorch's fp32 matmuls are IEEE unless the user allowed
TF32 (``torch.backends.cuda.matmul.allow_tf32``, or ``torch.set_float32_matmul_precision``
below ``"highest"``). :func:`fp32_precision` reads that setting at each launch. The
interpreter computes fp32 products exactly, so under it a TF32 setting is emulated: the
operands' mantissas are cut to TF32's 10 bits (truncation, the larger of the rounding errors
hardware may make) before the product.
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
EMULATE_TF32: tl.constexpr = tl.constexpr(INTERPRET)

# Launches per configuration of the interpreter's stand-in for the autotuner's timing: more
# than one, so that an update applied at every launch shows.
BENCH_LAUNCHES = 2


def _bench_by_launching(kernel_call, quantiles=None):
    """The interpreter's stand-in for ``do_bench``: launch, no timing (every configuration
    ties and the first wins)."""
    for _ in range(BENCH_LAUNCHES):
        kernel_call()
    return [1.0, 1.0, 1.0]


def autotune(tuned: list[triton.Config], interpreted: list[triton.Config], key: list[str],
             restore_value: list[str], prune=None):
    """``triton.autotune`` over ``tuned`` on a GPU and ``interpreted`` (two or more, larger
    blocks: each program instance costs about 0.7 ms there) under the interpreter.
    ``restore_value``: every argument the kernel may write in place (an empty list says it
    writes none). ``key``: every argument that changes the kernel's resources (operand
    kinds, flags), besides the sizes; tensor dtypes are added by Triton. ``prune``: an
    ``early_config_prune`` (see ``gemm.py``)."""
    return triton.autotune(
        configs=interpreted if INTERPRET else tuned, key=key, restore_value=restore_value,
        prune_configs_by={"early_config_prune": prune} if prune is not None else None,
        do_bench=_bench_by_launching if INTERPRET else None)


# Shared memory one block may use, by compute capability (the opt-in maximum): A100 163 KiB,
# consumer Ada (RTX 40x0) 99 KiB, H100 227 KiB. For a capability not listed, the device's own
# figure (on a GPU) or the smallest of these.
SHARED_MEMORY = {(8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376,
                 (9, 0): 232448}
# Set by the ahead-of-time compile check (benchmarks/aot_compile.py) to the capability it
# compiles for; on a GPU the current device's.
target_capability: tuple[int, int] | None = None


def shared_memory_limit(device: torch.device | None = None) -> int:
    if target_capability is not None:
        return SHARED_MEMORY.get(target_capability, min(SHARED_MEMORY.values()))
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return min(SHARED_MEMORY.values()) if not INTERPRET else 1 << 30


def capability(device: torch.device | None = None) -> tuple[int, int]:
    if target_capability is not None:
        return target_capability
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return (8, 0)


def fp32_precision() -> str:
    """``"ieee"``, or ``"tf32"`` when the user allowed TF32 for fp32 matmuls."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def dot_dtype(*tensors: torch.Tensor) -> tl.dtype:
    """The dtype dot operands are cast to: fp32 under the interpreter or when any operand is
    fp32 (then IEEE or TF32 by :func:`fp32_precision`), else the operands' reduced dtype
    (bf16 or fp16 tensor cores, fp32 accumulation)."""
    if INTERPRET or any(t.dtype == torch.float32 for t in tensors):
        return tl.float32
    return tl.bfloat16 if any(t.dtype == torch.bfloat16 for t in tensors) else tl.float16


@triton.jit
def to_tf32(x):
    """``x`` (fp32) with its mantissa cut to TF32's 10 bits (the interpreter's emulation)."""
    bits = x.to(tl.uint32, bitcast=True) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """``a @ b`` with operands in ``DOT``; fp32 products in ``PRECISION`` ("ieee" or
    "tf32"), TF32 emulated under the interpreter."""
    a = a.to(DOT)
    b = b.to(DOT)
    # (Upper-case names are Triton's compile-time arguments here, not constants: SIM300.)
    if EMULATE_TF32 and PRECISION == "tf32" and DOT == tl.float32:  # noqa: SIM300
        a = to_tf32(a)
        b = to_tf32(b)
    if DOT == tl.float32:  # noqa: SIM300
        return tl.dot(a, b, input_precision=PRECISION)
    return tl.dot(a, b)


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """``x`` (fp32) in the output dtype, rounded to nearest even also under the
    interpreter (for bf16: add half an ulp, plus one on ties to odd, then truncate)."""
    if EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def offsets(block, BLOCK: tl.constexpr):
    """The flat offsets of program ``block``'s elements, in int64: ``block * BLOCK`` passes
    2**31 for a tensor of that many elements (a 128k x 16k embedding)."""
    return block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


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
    no device read). Kernels take keys in ``do_not_specialize`` arguments: Triton would
    otherwise turn a key of 1 into a compile-time constant, which ``.to(tl.uint32)``
    rejects."""
    from subspace_optim import counter_rng

    return int(counter_rng.key(seed, stream))
