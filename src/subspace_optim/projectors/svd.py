"""GaLore's projector: the top singular vectors of the current gradient.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
ICML 2024, https://arxiv.org/abs/2403.03507; reference code jiaweizzhao/GaLore.

At steps 0, T, 2T, ... (T = ``update_proj_gap``) the gradient's SVD is taken in fp32
whatever the parameter's dtype (there is no bf16 SVD on CUDA, pytorch#98308; float64
gradients in float64), truncated to
``rank`` and stored, like the reference, in the gradient's dtype: ``Vh[:r]`` (``r x n``) on
the right side, ``U[:, :r]`` (``m x r``) on the left. The moments are kept across refreshes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._warn import warn_once
from .base import MatrixProjector, Side, register_projector, working_dtype


def top_singular_basis(grad: Tensor, rank: int, side: Side) -> Tensor | None:
    """Orthonormal basis of the top-``rank`` singular subspace of ``grad`` on ``side``.

    Tries fp32, then fp64 (ill-conditioned gradients make LAPACK/cuSOLVER fail to converge,
    GaLore issue #58). Returns ``None`` if both fail or give non-finite values, so the
    caller can keep its previous basis instead of training on NaN.
    """
    if grad.is_meta:
        # Shape and dtype only: the memory planner builds the state on meta tensors.
        m, n = grad.shape
        return grad.new_empty((rank, n) if side == "right" else (m, rank), dtype=torch.float32)
    for dtype in dict.fromkeys((working_dtype(grad), torch.float64)):
        try:
            u, _, vh = torch.linalg.svd(grad.to(dtype), full_matrices=False)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            continue
        basis = vh[:rank] if side == "right" else u[:, :rank]
        if bool(torch.isfinite(basis).all()):
            return _compact(basis)
    return None


def _compact(basis: Tensor) -> Tensor:
    """A copy that owns just its elements: the slice is a view that would keep LAPACK's
    whole factor alive in the state (min(m, n) / rank times the basis). The copy keeps the
    slice's layout (LAPACK's column-major on the CPU), in which the projections were always
    computed, so their rounding does not change."""
    if basis.stride(0) == 1 and basis.dim() == 2:
        return basis.mT.clone(memory_format=torch.contiguous_format).mT
    return basis.clone(memory_format=torch.contiguous_format)


def refreshed_basis(state: dict, grad: Tensor, rank: int, side: Side) -> Tensor | None:
    """The new fp32/fp64 basis for a refresh, or ``None`` to keep ``state["proj_basis"]``.

    Shared by every SVD-based projector: on a failed SVD it keeps the previous basis (or,
    before any exists, the first coordinate directions) with a one-time warning.
    """
    basis = top_singular_basis(grad, rank, side)
    if basis is not None:
        return basis
    shape = tuple(grad.shape)
    if "proj_basis" in state or "proj_codes" in state:
        warn_once(
            "svd-keep",
            f"SVD of a {shape} gradient failed in fp32 and fp64 (non-finite or "
            "ill-conditioned gradient); keeping the previous projection basis. "
            "Shown once per process.",
        )
        return None
    warn_once(
        "svd-first",
        f"SVD of a {shape} gradient failed in fp32 and fp64 before any basis existed; "
        "using the first coordinate directions until the next refresh. "
        "Shown once per process.",
    )
    return _coordinate_basis(grad, rank, side)


class SVDProjector(MatrixProjector):
    """GaLore: SVD of the gradient every ``update_proj_gap`` steps; state ``proj_basis``."""

    name = "galore"
    param_dtype_state_keys = frozenset({"proj_basis"})
    basis_key = "proj_basis"
    refresh_on_owner = True

    def refresh(self, state: dict, group: dict, grad: Tensor, side: Side) -> None:
        basis = refreshed_basis(state, grad, group["rank"], side)
        if basis is not None:
            state["proj_basis"] = basis.to(grad.dtype)
        return None

    def basis(self, state: dict, group: dict, grad: Tensor, side: Side) -> Tensor:
        return state["proj_basis"]


def _coordinate_basis(grad: Tensor, rank: int, side: Side) -> Tensor:
    m, n = grad.shape
    if side == "right":
        return torch.eye(rank, n, device=grad.device)
    return torch.eye(m, rank, device=grad.device)


register_projector(SVDProjector())
