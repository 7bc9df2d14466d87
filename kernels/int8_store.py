"""Triton implementation of the stochastic-rounding INT8 store (``int8_sr_store_``): one
program per group of ``group_size`` consecutive elements (the weight flat, the last group
zero-padded), which finds the group's range (widened to include zero), its scale
``range / 254`` and zero-point ``ceil(-lo / s)``, and rounds each element to
``floor(w / s) + [u < frac(w / s)] + zero``, clamped to [0, 255]. ``u`` is the counter-based
uniform of (key(seed, offset), the element's padded flat index), as in the PyTorch
implementation, so both round the same way and a resumed run repeats the draws. Equal in
expectation to the float weight: no draw is clipped on this grid.
"""

from __future__ import annotations

import triton
import triton.language as tl

from subspace_optim import ops
from subspace_optim.quant.groupwise import MIN_RANGE

from ._common import hash_bits, key32, to_uniform


@triton.jit(do_not_specialize=["key"])
def _sr_kernel(w_ptr, codes_ptr, scales_ptr, zeros_ptr, n, group, key, min_range,
               BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    flat = g * group + idx
    inside = (idx < group) & (flat < n)
    w = tl.load(w_ptr + flat, mask=inside, other=0.0).to(tl.float32)
    lo = tl.minimum(tl.min(tl.where(idx < group, w, 0.0), axis=0), 0.0)
    hi = tl.maximum(tl.max(tl.where(idx < group, w, 0.0), axis=0), 0.0)
    scale = tl.maximum(hi - lo, min_range) / 254.0
    zero = tl.minimum(tl.maximum(tl.ceil(-lo / scale), 0.0), 254.0)
    scaled = w / scale
    low = tl.floor(scaled)
    u = to_uniform(hash_bits(key.to(tl.uint32), flat))
    q = low + (u < scaled - low).to(tl.float32) + zero
    q = tl.minimum(tl.maximum(q, 0.0), 255.0)
    tl.store(codes_ptr + flat, q.to(tl.uint8), mask=inside)
    tl.store(scales_ptr + g, scale)
    tl.store(zeros_ptr + g, zero.to(tl.uint8))


@ops.register_triton("int8_sr_store_")
def int8_sr_store_(codes, scales, zeros, weight, seed, offset, group_size):
    n = weight.numel()
    groups = triton.cdiv(n, group_size)
    _sr_kernel[(groups,)](weight.contiguous(), codes, scales, zeros, n, group_size,
                          key32(seed, offset), MIN_RANGE,
                          BLOCK=triton.next_power_of_2(group_size))
