"""Triton implementations of Grass's ops: the gather of the selected rows (columns) and the
scatter-update of the weight, one pass each.

Rows (left side) or columns (right) ``idx`` (sorted, int32/int64) with scales ``rho``:
``grass_gather``: ``R = rho * G[idx, :]`` or ``G[:, idx] * rho``.
``grass_scatter_update_``: ``W <- beta W`` and ``W[idx] += alpha rho N``: with ``beta = 1``
only the selected rows (columns) are touched; otherwise every element once, through the
inverse map ``position[row] = i or -1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from subspace_optim import ops

from ._common import cast_out

_BR, _BC = 32, 128


@triton.jit
def _gather_kernel(g_ptr, idx_ptr, scale_ptr, out_ptr, rows, cols, s_g0, s_g1, s_o0, s_o1,
                   RIGHT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # Output tile (i, j): left: out[i, j] = rho_i G[idx_i, j]; right: out[i, j] = G[i, idx_j] rho_j.
    ri = tl.program_id(0) * BR + tl.arange(0, BR)
    cj = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (ri[:, None] < rows) & (cj[None, :] < cols)
    if RIGHT:
        sel = tl.load(idx_ptr + cj, mask=cj < cols, other=0).to(tl.int64)
        rho = tl.load(scale_ptr + cj, mask=cj < cols, other=0.0)
        x = tl.load(g_ptr + ri[:, None] * s_g0 + sel[None, :] * s_g1, mask=mask, other=0.0)
        y = x.to(tl.float32) * rho[None, :]
    else:
        sel = tl.load(idx_ptr + ri, mask=ri < rows, other=0).to(tl.int64)
        rho = tl.load(scale_ptr + ri, mask=ri < rows, other=0.0)
        x = tl.load(g_ptr + sel[:, None] * s_g0 + cj[None, :] * s_g1, mask=mask, other=0.0)
        y = x.to(tl.float32) * rho[:, None]
    tl.store(out_ptr + ri[:, None] * s_o0 + cj[None, :] * s_o1,
             cast_out(y, out_ptr.dtype.element_ty), mask=mask)


@ops.register_triton("grass_gather")
def grass_gather(grad, indices, scales, right):
    m, n = grad.shape
    r = indices.numel()
    shape = (m, r) if right else (r, n)
    out = torch.empty(shape, device=grad.device, dtype=grad.dtype)
    grid = (triton.cdiv(shape[0], _BR), triton.cdiv(shape[1], _BC))
    _gather_kernel[grid](grad, indices, scales, out, shape[0], shape[1], grad.stride(0),
                         grad.stride(1), out.stride(0), out.stride(1), RIGHT=right, BR=_BR,
                         BC=_BC)
    return out


@triton.jit
def _scatter_rows_kernel(w_ptr, n_ptr, idx_ptr, scale_ptr, count, other, s_w0, s_w1,
                         s_n0, s_n1, alpha, RIGHT: tl.constexpr, BR: tl.constexpr,
                         BC: tl.constexpr):
    # beta == 1: only the selected rows (columns) of W, each read and written once.
    i = tl.program_id(0) * BR + tl.arange(0, BR)  # position among the selected
    j = tl.program_id(1) * BC + tl.arange(0, BC)  # along the other dimension
    mask = (i[:, None] < count) & (j[None, :] < other)
    sel = tl.load(idx_ptr + i, mask=i < count, other=0).to(tl.int64)
    rho = tl.load(scale_ptr + i, mask=i < count, other=0.0)
    if RIGHT:  # columns idx of W (m x n); N is m x r: element (j, i)
        w_ptrs = w_ptr + j[None, :] * s_w0 + sel[:, None] * s_w1
        upd = tl.load(n_ptr + j[None, :] * s_n0 + i[:, None] * s_n1, mask=mask, other=0.0)
    else:  # rows idx of W; N is r x n: element (i, j)
        w_ptrs = w_ptr + sel[:, None] * s_w0 + j[None, :] * s_w1
        upd = tl.load(n_ptr + i[:, None] * s_n0 + j[None, :] * s_n1, mask=mask, other=0.0)
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    w = w + alpha * (rho[:, None] * upd.to(tl.float32))
    tl.store(w_ptrs, cast_out(w, w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_all_kernel(w_ptr, n_ptr, pos_ptr, scale_ptr, rows, cols, s_w0, s_w1, s_n0,
                        s_n1, alpha, beta, RIGHT: tl.constexpr, BR: tl.constexpr,
                        BC: tl.constexpr):
    # beta != 1: every element of W once; selected rows (columns) also take the update.
    ri = tl.program_id(0) * BR + tl.arange(0, BR)
    cj = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (ri[:, None] < rows) & (cj[None, :] < cols)
    w_ptrs = w_ptr + ri[:, None] * s_w0 + cj[None, :] * s_w1
    w = beta * tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    if RIGHT:
        pos = tl.load(pos_ptr + cj, mask=cj < cols, other=-1)
        hit = mask & (pos[None, :] >= 0)
        rho = tl.load(scale_ptr + tl.maximum(pos, 0), mask=cj < cols, other=0.0)
        upd = tl.load(n_ptr + ri[:, None] * s_n0 + tl.maximum(pos, 0)[None, :] * s_n1,
                      mask=hit, other=0.0).to(tl.float32) * rho[None, :]
    else:
        pos = tl.load(pos_ptr + ri, mask=ri < rows, other=-1)
        hit = mask & (pos[:, None] >= 0)
        rho = tl.load(scale_ptr + tl.maximum(pos, 0), mask=ri < rows, other=0.0)
        upd = tl.load(n_ptr + tl.maximum(pos, 0)[:, None] * s_n0 + cj[None, :] * s_n1,
                      mask=hit, other=0.0).to(tl.float32) * rho[:, None]
    w = tl.where(hit, w + alpha * upd, w)
    tl.store(w_ptrs, cast_out(w, w_ptr.dtype.element_ty), mask=mask)


@ops.register_triton("grass_scatter_update_")
def grass_scatter_update_(weight, low, indices, scales, right, alpha, beta):
    m, n = weight.shape
    r = indices.numel()
    strides = (weight.stride(0), weight.stride(1), low.stride(0), low.stride(1))
    if beta == 1.0:
        other = m if right else n
        grid = (triton.cdiv(r, _BR), triton.cdiv(other, _BC))
        _scatter_rows_kernel[grid](weight, low, indices, scales, r, other, *strides,
                                   float(alpha), RIGHT=right, BR=_BR, BC=_BC)
        return
    position = torch.full((n if right else m,), -1, device=weight.device, dtype=torch.int32)
    position[indices.long()] = torch.arange(r, device=weight.device, dtype=torch.int32)
    grid = (triton.cdiv(m, _BR), triton.cdiv(n, _BC))
    _scatter_all_kernel[grid](weight, low, position, scales, m, n, *strides, float(alpha),
                              float(beta), RIGHT=right, BR=_BR, BC=_BC)
