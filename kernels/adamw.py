"""Triton implementations of the AdamW ops: ``projected_adamw_update`` (the moments and the
normalised direction in one elementwise pass over the r-sized state, then the
back-projection GEMM with the weight update in its epilogue) and ``blockwise8_adamw_update``
(8-bit moments dequantised, updated and requantised in registers).

Elementwise kernel (one pass, any size, fp32 arithmetic in registers; moments and gradient
of one dtype, fp32 or bf16/fp16)::

    m <- m + (1 - b1) (g - m);  v <- b2 v + (1 - b2) g^2        (torch's lerp_ / addcmul_)
    torch:  N = m / (sqrt(v) / sqrt(1 - b2^t) + eps);   galore: N = m / (sqrt(v) + eps)

then ``out = N`` (for the back-projection) or, full rank, ``W <- beta W + alpha N`` in the same
pass. The GEMM (``gemm.py``) lands ``W <- beta W + alpha back(N)``: decay in ``beta`` (torch's
order: ``beta = 1 - lr wd``, ``alpha = -lr scale c``; galore's order, decay after the update:
both times ``1 - lr wd``), so no full-size temporary and one read and write of the weight.
The down-projection (the gradient times the basis) stays with cuBLAS, outside the op.

Layouts: the elementwise kernel walks memory in order, so g, m, v and the weight must share
one layout (the same strides, non-overlapping and dense). The moments are created in the
parameter's layout (``zeros_like``) and so is, usually, the gradient; a tensor in another
layout (a transposed parameter's contiguous gradient, moments loaded from a checkpoint
written by the PyTorch path) is first copied into the moments' layout, and a weight in
another layout is updated through such a copy. Offsets are 64-bit.

8-bit kernel: blocks of 256 (bitsandbytes' block size), one program per block: codes ->
``qmap[code] * absmax``, the update, the new absmax of the block, and the nearest code by
the midpoints of the sorted dynamic map (bitsandbytes' rule), found by a binary search over
the 255 midpoints (eight comparisons per element: a comparison with all 255 at once held a
256 x 256 tile and spilled registers), so the states stay interchangeable with the PyTorch
path. Codes and the gradient are read in logical (row-major) order. Returns N (fp32).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from subspace_optim import ops
from subspace_optim.quant.blockwise import BLOCK_SIZE, TINY, dynamic_map, midpoints
from subspace_optim.rules.adamw import adamw_factor

from . import gemm
from ._common import INTERPRET, cast_out, offsets

_TINY = tl.constexpr(TINY)  # the PyTorch quantiser's floor on a block's absmax

_ELEMENTWISE_BLOCK = 4096 if INTERPRET else 1024


@triton.jit
def _moments(g, m, v, beta1, beta2, eps, root2, GALORE: tl.constexpr):
    """Adam's moments of ``g`` and the normalised direction, in fp32."""
    # torch's lerp_ (the PyTorch path): one fma with the weight 1 - beta1, from the end
    # nearer the weight, so both paths round alike.
    w = 1.0 - beta1
    if w < 0.5:  # noqa: SIM108 (a runtime branch: Triton takes no conditional expression)
        m = tl.fma(g - m, w, m)
    else:
        m = tl.fma(g - m, w - 1.0, g)
    v = v * beta2 + (1.0 - beta2) * g * g
    if GALORE:
        return m, v, m / (tl.sqrt_rn(v) + eps)
    return m, v, m / (tl.sqrt_rn(v) / root2 + eps)


@triton.jit
def _adamw_kernel(g_ptr, m_ptr, v_ptr, out_ptr, n, beta1, beta2, eps, root2, alpha, beta,
                  GALORE: tl.constexpr, MAXIMIZE: tl.constexpr, WEIGHT: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = offsets(tl.program_id(0), BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m, v, direction = _moments(g, m, v, beta1, beta2, eps, root2, GALORE)
    tl.store(m_ptr + offs, cast_out(m, m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, cast_out(v, v_ptr.dtype.element_ty), mask=mask)
    if WEIGHT:
        w = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, cast_out(beta * w + alpha * direction,
                                          out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + offs, cast_out(direction, out_ptr.dtype.element_ty), mask=mask)


def _scalars(step, lr, beta1, beta2, weight_decay, scale, galore, correct_bias):
    """``(root2, alpha, beta)``: sqrt(1 - b2^t), and the folded update's coefficients."""
    root2 = math.sqrt(1 - beta2**step) if correct_bias else 1.0
    factor = adamw_factor(step, beta1, beta2, correct_bias, "galore" if galore else "torch")
    decay = 1.0 - lr * weight_decay
    alpha = -scale * lr * factor
    return root2, (alpha * decay if galore else alpha), decay


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its memory exactly once in some order of its dimensions."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _in_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory layout (itself when it already is)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _elementwise(grad, exp_avg, exp_avg_sq, out, scalars, galore, maximize, weight):
    """The elementwise kernel over tensors brought to one layout (see the module
    docstring); moments and ``out`` written back where they were copies."""
    moments = (exp_avg, exp_avg_sq)
    shared = (exp_avg.stride() == exp_avg_sq.stride()
              and _dense(exp_avg))
    m, v = moments if shared else (exp_avg.contiguous(), exp_avg_sq.contiguous())
    g, o = _in_layout(grad, m), _in_layout(out, m)
    n = g.numel()
    _adamw_kernel[(triton.cdiv(n, _ELEMENTWISE_BLOCK),)](
        g, m, v, o, n, *scalars, GALORE=galore, MAXIMIZE=maximize, WEIGHT=weight,
        BLOCK=_ELEMENTWISE_BLOCK)
    for stored, used in ((exp_avg, m), (exp_avg_sq, v), (out, o)):
        if stored is not used:
            stored.copy_(used)


@ops.register_triton("projected_adamw_update")
def projected_adamw_update(weight, grad, basis, exp_avg, exp_avg_sq, step, lr, beta1, beta2,
                           eps, weight_decay, scale, right, galore, correct_bias, maximize):
    root2, alpha, beta = _scalars(step, lr, beta1, beta2, weight_decay, scale, galore,
                                  correct_bias)
    if basis is None:  # full rank: the weight is updated in the same pass
        _elementwise(grad, exp_avg, exp_avg_sq, weight,
                     (beta1, beta2, eps, root2, alpha, beta), galore, maximize, True)
        return
    direction = torch.empty_like(exp_avg)  # r-sized; the only temporary
    _elementwise(grad, exp_avg, exp_avg_sq, direction, (beta1, beta2, eps, root2, 0.0, 0.0),
                 galore, maximize, False)
    m, k = weight.shape
    if right:  # W (m x n) += N (m x r) @ B (r x n)
        gemm.matmul(gemm.dense(direction), gemm.dense(basis), m, k, direction.shape[1],
                    weight, alpha=alpha, beta=beta, update=True)
    else:  # W += B (m x r) @ N (r x n)
        gemm.matmul(gemm.dense(basis), gemm.dense(direction), m, k, direction.shape[0],
                    weight, alpha=alpha, beta=beta, update=True)


@triton.jit
def _blockwise8_kernel(g_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, qs_ptr, qu_ptr, bs_ptr, bu_ptr,
                       out_ptr, n, beta1, beta2, eps, root2, GALORE: tl.constexpr,
                       MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    offs = offsets(block, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    mc = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
    vc = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(qs_ptr + mc.to(tl.int64)) * tl.load(ma_ptr + block.to(tl.int64))
    v = tl.load(qu_ptr + vc.to(tl.int64)) * tl.load(va_ptr + block.to(tl.int64))
    m, v, direction = _moments(g, m, v, beta1, beta2, eps, root2, GALORE)
    tl.store(out_ptr + offs, direction, mask=mask)
    _requantise(tl.where(mask, m, 0.0), mc_ptr, ma_ptr, bs_ptr, offs, mask, block)
    _requantise(tl.where(mask, v, 0.0), vc_ptr, va_ptr, bu_ptr, offs, mask, block)


@triton.jit
def _requantise(x, codes_ptr, absmax_ptr, bounds_ptr, offs, mask, block):
    """The block's absmax, then the nearest entry of the sorted map: the count of the
    midpoints below the scaled value, by binary search (the 256th midpoint is +inf and
    never passed)."""
    absmax = tl.max(tl.abs(x), axis=0)
    scaled = tl.minimum(tl.maximum(x * (1.0 / tl.maximum(absmax, _TINY)), -1.0), 1.0)
    code = tl.zeros(x.shape, dtype=tl.int64)
    for shift in tl.static_range(7, -1, -1):
        step = 1 << shift
        bound = tl.load(bounds_ptr + (code + (step - 1)))
        code = tl.where(scaled > bound, code + step, code)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + block.to(tl.int64), absmax)


@ops.register_triton("blockwise8_adamw_update")
def blockwise8_adamw_update(grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                            exp_avg_sq_absmax, step, beta1, beta2, eps, galore, correct_bias,
                            maximize):
    device = grad.device
    root2 = math.sqrt(1 - beta2**step) if correct_bias else 1.0
    out = torch.empty(grad.shape, device=device, dtype=torch.float32)
    n = grad.numel()
    # Blocks run over the logical (row-major) order, as the PyTorch path's.
    codes = [c if c.is_contiguous() else c.contiguous()
             for c in (exp_avg_codes, exp_avg_sq_codes)]
    _blockwise8_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        grad.contiguous(), codes[0], exp_avg_absmax, codes[1], exp_avg_sq_absmax,
        dynamic_map(True, device), dynamic_map(False, device), midpoints(True, device),
        midpoints(False, device), out, n, beta1, beta2, eps, root2, GALORE=galore,
        MAXIMIZE=maximize, BLOCK=BLOCK_SIZE)
    for stored, used in zip((exp_avg_codes, exp_avg_sq_codes), codes, strict=True):
        if stored is not used:
            stored.copy_(used)
    return out
