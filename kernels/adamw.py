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

8-bit kernel: blocks of 256 (bitsandbytes' block size), one program per block: codes ->
``qmap[code] * absmax``, the update, the new absmax of the block, and the nearest code by
the midpoints of the sorted dynamic map (bitsandbytes' rule), so the states stay
interchangeable with the PyTorch path. Returns N (fp32).
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
from ._common import INTERPRET, cast_out

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
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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


@ops.register_triton("projected_adamw_update")
def projected_adamw_update(weight, grad, basis, exp_avg, exp_avg_sq, step, lr, beta1, beta2,
                           eps, weight_decay, scale, right, galore, correct_bias, maximize):
    root2, alpha, beta = _scalars(step, lr, beta1, beta2, weight_decay, scale, galore,
                                  correct_bias)
    n = grad.numel()
    grid = (triton.cdiv(n, _ELEMENTWISE_BLOCK),)
    if basis is None:  # full rank: the weight is updated in the same pass
        _adamw_kernel[grid](grad, exp_avg, exp_avg_sq, weight, n, beta1, beta2, eps, root2,
                            alpha, beta, GALORE=galore, MAXIMIZE=maximize, WEIGHT=True,
                            BLOCK=_ELEMENTWISE_BLOCK)
        return
    direction = torch.empty_like(exp_avg)  # r-sized; the only temporary
    _adamw_kernel[grid](grad, exp_avg, exp_avg_sq, direction, n, beta1, beta2, eps, root2,
                        0.0, 0.0, GALORE=galore, MAXIMIZE=maximize, WEIGHT=False,
                        BLOCK=_ELEMENTWISE_BLOCK)
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
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    codes = tl.arange(0, 256)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    mc = tl.load(mc_ptr + offs, mask=mask, other=0).to(tl.int32)
    vc = tl.load(vc_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(qs_ptr + mc) * tl.load(ma_ptr + block)
    v = tl.load(qu_ptr + vc) * tl.load(va_ptr + block)
    m, v, direction = _moments(g, m, v, beta1, beta2, eps, root2, GALORE)
    tl.store(out_ptr + offs, direction, mask=mask)
    _requantise(tl.where(mask, m, 0.0), mc_ptr, ma_ptr, bs_ptr, offs, mask, block, codes)
    _requantise(tl.where(mask, v, 0.0), vc_ptr, va_ptr, bu_ptr, offs, mask, block, codes)


@triton.jit
def _requantise(x, codes_ptr, absmax_ptr, bounds_ptr, offs, mask, block, codes):
    """The block's absmax, then the nearest entry of the sorted map: the count of the
    midpoints below the scaled value (the 256th midpoint is +inf)."""
    absmax = tl.max(tl.abs(x), axis=0)
    scaled = tl.minimum(tl.maximum(x * (1.0 / tl.maximum(absmax, _TINY)), -1.0), 1.0)
    bounds = tl.load(bounds_ptr + codes)
    code = tl.sum((scaled[:, None] > bounds[None, :]).to(tl.int32), axis=1)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + block, absmax)


@ops.register_triton("blockwise8_adamw_update")
def blockwise8_adamw_update(grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes,
                            exp_avg_sq_absmax, step, beta1, beta2, eps, galore, correct_bias,
                            maximize):
    device = grad.device
    root2 = math.sqrt(1 - beta2**step) if correct_bias else 1.0
    out = torch.empty(grad.shape, device=device, dtype=torch.float32)
    n = grad.numel()
    _blockwise8_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
        dynamic_map(True, device), dynamic_map(False, device), midpoints(True, device),
        midpoints(False, device), out, n, beta1, beta2, eps, root2, GALORE=galore,
        MAXIMIZE=maximize, BLOCK=BLOCK_SIZE)
    return out
