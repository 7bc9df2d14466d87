"""Triton implementations of Grass's ops: the gather of the selected rows (columns) and the
scatter-update of the weight, one pass each.

Rows (left side) or columns (right) ``idx`` (sorted ascending, int32/int64) with scales
``rho``: ``grass_gather``: ``R = rho * G[idx, :]`` or ``G[:, idx] * rho``.
``grass_scatter_update_``: ``W <- beta W`` and ``W[idx] += alpha rho N``: with ``beta = 1``
only the selected rows (columns) are touched; otherwise every element once, through the
inverse map ``position[row] = first i with idx_i = row``.

A repeated index adds each of its updates, as ``index_add_`` does: the program of the first
position of a run of equal indices sums the run (its length bounded by the longest run,
computed on the device, 1 without repeats), the others store nothing, so no two programs
write one row. Offsets are 64-bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from subspace_optim import ops

from ._common import INTERPRET, cast_out

# Tiles of 16 x 64 elements over 4 warps: no register spills on sm_80/89/90 (measured by
# benchmarks/aot_compile.py; 32 x 128 spilled up to 3 KB per thread in the scatter kernels).
# Larger under the interpreter, where each program instance costs about 0.7 ms.
_BR, _BC = (32, 128) if INTERPRET else (16, 64)
_WARPS = 4


@triton.jit
def _gather_kernel(g_ptr, idx_ptr, scale_ptr, out_ptr, rows, cols, s_g0, s_g1, s_o0, s_o1,
                   RIGHT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    # Output tile (i, j): left: out[i, j] = rho_i G[idx_i, j]; right: out[i, j] = G[i, idx_j] rho_j.
    ri = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cj = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
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
                         BC=_BC, num_warps=_WARPS)
    return out


@triton.jit
def _run_sum(n_ptr, idx_ptr, scale_ptr, start, sel, count, other_idx, live, s_n0, s_n1,
             longest, RIGHT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """Sum of ``rho_k N_k`` over the run of positions ``k = start, start + 1, ...`` whose
    index equals ``sel`` (a (BR, BC) tile; ``start``/``sel`` along the tile's first axis,
    ``other_idx`` along its second; ``live`` masks the tile)."""
    acc = tl.zeros((BR, BC), dtype=tl.float32)
    for t in range(0, longest):
        k = start + t
        same = (k < count) & (tl.load(idx_ptr + k, mask=k < count, other=-1).to(tl.int64)
                              == sel)
        rho = tl.load(scale_ptr + k, mask=same, other=0.0)
        hit = live & same[:, None]
        if RIGHT:  # N is m x r: element (other, k)
            upd = tl.load(n_ptr + other_idx[None, :] * s_n0 + k[:, None] * s_n1, mask=hit,
                          other=0.0)
        else:  # N is r x n: element (k, other)
            upd = tl.load(n_ptr + k[:, None] * s_n0 + other_idx[None, :] * s_n1, mask=hit,
                          other=0.0)
        acc += rho[:, None] * upd.to(tl.float32)
    return acc


@triton.jit
def _scatter_rows_kernel(w_ptr, n_ptr, idx_ptr, scale_ptr, longest_ptr, count, other, s_w0,
                         s_w1, s_n0, s_n1, alpha, RIGHT: tl.constexpr, BR: tl.constexpr,
                         BC: tl.constexpr):
    # beta == 1: only the selected rows (columns) of W, each read and written once, by the
    # program of the first position of its run.
    i = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # position among the selected
    j = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)  # along the other dimension
    inside = i < count
    sel = tl.load(idx_ptr + i, mask=inside, other=-1).to(tl.int64)
    prev = tl.load(idx_ptr + (i - 1), mask=inside & (i > 0), other=-1).to(tl.int64)
    first = inside & (sel != prev)
    mask = first[:, None] & (j[None, :] < other)
    acc = _run_sum(n_ptr, idx_ptr, scale_ptr, i, sel, count, j, mask, s_n0, s_n1,
                   tl.load(longest_ptr), RIGHT, BR, BC)
    if RIGHT:  # columns idx of W (m x n): the tile is (position, row)
        w_ptrs = w_ptr + j[None, :] * s_w0 + sel[:, None] * s_w1
    else:
        w_ptrs = w_ptr + sel[:, None] * s_w0 + j[None, :] * s_w1
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, cast_out(w + alpha * acc, w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_all_kernel(w_ptr, n_ptr, idx_ptr, pos_ptr, scale_ptr, longest_ptr, count, rows,
                        cols, s_w0, s_w1, s_n0, s_n1, alpha, beta, RIGHT: tl.constexpr,
                        BR: tl.constexpr, BC: tl.constexpr):
    # beta != 1: every element of W once; selected rows (columns) also take their run's sum.
    ri = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cj = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC)
    mask = (ri[:, None] < rows) & (cj[None, :] < cols)
    w_ptrs = w_ptr + ri[:, None] * s_w0 + cj[None, :] * s_w1
    w = beta * tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    longest = tl.load(longest_ptr)
    if RIGHT:  # the selected dimension is the columns: sum along the tile's second axis
        pos = tl.load(pos_ptr + cj, mask=cj < cols, other=count).to(tl.int64)
        live = tl.trans(mask) & (pos < count)[:, None]
        acc = tl.trans(_run_sum(n_ptr, idx_ptr, scale_ptr, pos, cj, count, ri, live, s_n0,
                                s_n1, longest, RIGHT, BC, BR))
        hit = mask & (pos < count)[None, :]
    else:
        pos = tl.load(pos_ptr + ri, mask=ri < rows, other=count).to(tl.int64)
        hit = mask & (pos < count)[:, None]
        acc = _run_sum(n_ptr, idx_ptr, scale_ptr, pos, ri, count, cj, hit, s_n0, s_n1,
                       longest, RIGHT, BR, BC)
    w = tl.where(hit, w + alpha * acc, w)
    tl.store(w_ptrs, cast_out(w, w_ptr.dtype.element_ty), mask=mask)


def _longest_run(indices: torch.Tensor) -> torch.Tensor:
    """The length of the longest run of equal (sorted) indices, as a 1-element int32 device
    tensor: no host read."""
    r = indices.numel()
    starts = torch.ones(r, device=indices.device, dtype=torch.int32)
    if r > 1:
        starts[1:] = (indices[1:] != indices[:-1]).int()
    run = starts.cumsum(0) - 1
    lengths = torch.zeros(r, device=indices.device, dtype=torch.int32)
    lengths.index_add_(0, run, torch.ones_like(lengths))
    return lengths.amax().reshape(1)


@ops.register_triton("grass_scatter_update_")
def grass_scatter_update_(weight, low, indices, scales, right, alpha, beta):
    m, n = weight.shape
    r = indices.numel()
    if r == 0:
        if beta != 1.0:
            weight.mul_(beta)
        return
    longest = _longest_run(indices)
    strides = (weight.stride(0), weight.stride(1), low.stride(0), low.stride(1))
    if beta == 1.0:
        other = m if right else n
        grid = (triton.cdiv(r, _BR), triton.cdiv(other, _BC))
        _scatter_rows_kernel[grid](weight, low, indices, scales, longest, r, other, *strides,
                                   float(alpha), RIGHT=right, BR=_BR, BC=_BC,
                                   num_warps=_WARPS)
        return
    # position[row]: the first position of row's run, or r where row is not selected.
    position = torch.full((n if right else m,), r, device=weight.device, dtype=torch.int32)
    position.scatter_reduce_(0, indices.long(),
                             torch.arange(r, device=weight.device, dtype=torch.int32), "amin")
    grid = (triton.cdiv(m, _BR), triton.cdiv(n, _BC))
    _scatter_all_kernel[grid](weight, low, indices, position, scales, longest, r, m, n,
                              *strides, float(alpha), float(beta), RIGHT=right, BR=_BR,
                              BC=_BC, num_warps=_WARPS)
