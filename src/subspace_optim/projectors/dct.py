"""SVD-free subspace selection from a fixed DCT basis (Modoranu et al., "FFT-based Dynamic
Subspace Selection for Low-Rank Adaptive Optimization", arXiv 2505.17967; reference code
IST-DASLab/ISTA-DASLab-Optimizers ``fft_low_rank``).

All layers whose projected dimension is ``d`` share one orthonormal ``d x d`` DCT-II basis
``Q`` (columns ``Q[:, k] = sqrt(2/d) c_k cos(pi k (2j + 1) / (2d))``, ``c_0 = 1/sqrt 2``),
built once per (size, dtype, device) and cached, never stored per parameter or in the
``state_dict``. At a refresh the columns are scored by the l1 norm of the columns of
``S = G Q`` (rows of ``Q^T G`` on the left side) and the top ``rank`` are kept: the state
is just ``rank`` int16 indices (int32 past 32767), sorted so that an unchanged selection
keeps its moment layout.
The projected gradient at a refresh is read off ``S`` instead of being recomputed.

``sim_type="makhoul"`` computes ``S`` with an FFT (Makhoul 1980) in O(mn log n) instead of
the O(mn^2) product; both use the same DCT-II basis, so they select the same columns. (The
reference's ``matmul`` path multiplies by the transposed matrix, whose columns are DCT-III
vectors, so its two paths differ; here they agree by construction and by test.)

``rotate_subspace=True`` carries the moments into the new subspace with the ``r x r``
rotation ``R = Q_old^T Q_new``: ``m <- m R``, ``v <- |v R|`` (the reference's option).
The reference's update has no scale (``scale`` defaults to 1) and its refresh gap defaults
to 1 (select every step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validate import check_bool, check_choice
from .base import (
    KEEP,
    REPROJECT,
    MatrixProjector,
    Side,
    index_dtype,
    register_projector,
    working_dtype,
)

SIM_TYPES = ("matmul", "makhoul")


# One table per (size, dtype, device), shared by every layer. A plain dict rather than
# functools.cache: torch.compile reads a dict entry as a graph input, while it would trace
# through a cache wrapper and rebuild the table inside the graph.
_TABLES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def dct_basis(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The orthonormal DCT-II basis as the columns of a ``size x size`` matrix (cached)."""
    key = (size, dtype, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = _build(size).to(dtype=dtype, device=device)
    return table


@torch.compiler.disable
def _build(size: int) -> Tensor:
    j = torch.arange(size, dtype=torch.float64)[:, None]
    k = torch.arange(size, dtype=torch.float64)[None, :]
    q = math.sqrt(2 / size) * torch.cos(math.pi * k * (2 * j + 1) / (2 * size))
    q[:, 0] /= math.sqrt(2)
    return q


def dct2_makhoul(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last dimension through one FFT: equals ``x @ dct_basis``.

    Makhoul's reordering ``v = [x0, x2, x4, ..., x5, x3, x1]`` turns the DCT into an FFT of
    the same length: ``X_k = 2 Re(exp(-i pi k / 2N) FFT(v)_k)``, then orthonormal scaling.
    """
    n = x.shape[-1]
    work = working_dtype(x)
    v = torch.cat((x[..., ::2], x[..., 1::2].flip(-1)), dim=-1).to(work)
    spectrum = torch.fft.fft(v, dim=-1)
    k = torch.arange(n, device=x.device, dtype=work)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    out = 2 * (spectrum * twiddle).real
    out[..., 0] *= math.sqrt(1 / (4 * n))
    out[..., 1:] *= math.sqrt(1 / (2 * n))
    return out.to(x.dtype)


class DCTProjector(MatrixProjector):
    """Top-``rank`` DCT-II columns by gradient energy; state ``proj_indices`` (int16)."""

    name = "dct"
    defaults = {"update_proj_gap": 1, "scale": 1.0, "rotate_subspace": False, "sim_type": "matmul"}
    basis_key = "proj_indices"
    refresh_on_owner = True

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_choice(group, "sim_type", SIM_TYPES)
        check_bool(group, "rotate_subspace")

    def moment_policy(self, group: dict) -> str:
        return REPROJECT if group["rotate_subspace"] else KEEP

    def refresh(self, state: dict, group: dict, grad: Tensor, side: Side) -> Tensor:
        scores_of = transformed(grad, side, group["sim_type"])
        dim = 0 if side == "right" else 1
        scores = scores_of.abs().sum(dim=dim)
        indices = torch.topk(scores.to(working_dtype(scores)), group["rank"]).indices.sort().values
        state["proj_indices"] = indices.to(index_dtype(scores.numel()))
        return scores_of.index_select(1 - dim, indices)

    def basis(self, state: dict, group: dict, grad: Tensor, side: Side) -> Tensor:
        size = grad.shape[1] if side == "right" else grad.shape[0]
        columns = dct_basis(size, grad.dtype, grad.device).index_select(
            1, state["proj_indices"].int()
        )
        return columns.T if side == "right" else columns

    def reproject(self, old_basis: Tensor, new_basis: Tensor, moment: Tensor, side: Side) -> Tensor:
        # r x r rotation instead of a full-size back-and-forth projection, at the moment's
        # precision (it may exceed the basis's: state_bits=32 with bf16 weights).
        old, new = old_basis.to(moment.dtype), new_basis.to(moment.dtype)
        if side == "right":
            return moment @ (old @ new.T)
        return (new.T @ old) @ moment


def transformed(grad: Tensor, side: Side, sim_type: str) -> Tensor:
    """``G Q`` (right) or ``Q^T G`` (left) for the shared DCT-II basis ``Q``."""
    if sim_type == "makhoul":
        return dct2_makhoul(grad) if side == "right" else dct2_makhoul(grad.T).T
    if side == "right":
        return grad @ dct_basis(grad.shape[1], grad.dtype, grad.device)
    return dct_basis(grad.shape[0], grad.dtype, grad.device).T @ grad


register_projector(DCTProjector())
