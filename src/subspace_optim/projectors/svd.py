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

SVD_METHODS = ("full", "randomized")
# The randomized refresh's defaults (GaLore 2, arXiv 2504.20437; Halko, Martinsson and
# Tropp 2011): a sketch of rank + 8 columns refined by 2 power iterations.
SVD_DEFAULTS = {"svd": "full", "svd_oversample": 8, "svd_niter": 2}


def randomized_svd(a: Tensor, rank: int, oversample: int, niter: int,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(U, Vh)`` of the top-``rank`` singular subspaces of ``a`` by Halko et al.'s
    randomized range finder: a Gaussian sketch of ``k = rank + oversample`` columns of the
    matrix's smaller side, ``niter`` power iterations (orthonormalised by QR once per
    iteration, on that smaller side), then the exact SVD of the small ``k x max(m, n)``
    projection. ``O(m n k)`` instead of the full SVD's ``O(m n min(m, n))``; the sketch is
    drawn from ``generator`` (deterministic)."""
    transposed = a.shape[0] > a.shape[1]
    b = a.mT if transposed else a  # m <= n: the range of b lives on its smaller side
    m, n = b.shape
    k = min(rank + oversample, m)
    omega = torch.randn(n, k, generator=generator, device=a.device, dtype=torch.float32)
    y = b @ omega.to(a.dtype)
    for _ in range(niter):
        q, _ = torch.linalg.qr(y)
        y = b @ (b.mT @ q)
    q, _ = torch.linalg.qr(y)
    ub, _, vh = torch.linalg.svd(q.mT @ b, full_matrices=False)
    u = (q @ ub)[:, :rank]
    vh = vh[:rank]
    return (vh.mT, u.mT) if transposed else (u, vh)


def top_singular_basis(grad: Tensor, rank: int, side: Side, method: str = "full",
                       oversample: int = 8, niter: int = 2,
                       seed: int = 0) -> Tensor | None:
    """Orthonormal basis of the top-``rank`` singular subspace of ``grad`` on ``side``, by
    the full SVD or the randomized one (``method``; its sketch from ``seed``).

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
            if method == "randomized":
                generator = torch.Generator(device=grad.device).manual_seed(seed)
                u, vh = randomized_svd(grad.to(dtype), rank, oversample, niter, generator)
            else:
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


def refreshed_basis(state: dict, grad: Tensor, rank: int, side: Side,
                    group: dict | None = None) -> Tensor | None:
    """The new fp32/fp64 basis for a refresh, or ``None`` to keep ``state["proj_basis"]``.

    Shared by every SVD-based projector: on a failed SVD it keeps the previous basis (or,
    before any exists, the first coordinate directions) with a one-time warning. ``group``
    chooses the full or the randomized SVD (``svd``, ``svd_oversample``, ``svd_niter``);
    the randomized sketch is seeded by the step, so a resumed run draws it again alike.
    """
    group = group or {}
    basis = top_singular_basis(grad, rank, side, group.get("svd", "full"),
                               group.get("svd_oversample", 8), group.get("svd_niter", 2),
                               seed=int(state.get("step", 0)))
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


def validate_svd_keys(group: dict) -> None:
    """The SVD keys every SVD-based projector takes (``SVD_DEFAULTS``)."""
    from .._validate import check_choice, is_int

    check_choice(group, "svd", SVD_METHODS)
    for key in ("svd_oversample", "svd_niter"):
        value = group[key]
        if not is_int(value) or value < 0:
            raise ValueError(f"Invalid {key}: {value!r} (must be an integer >= 0)")


class SVDProjector(MatrixProjector):
    """GaLore: SVD of the gradient every ``update_proj_gap`` steps; state ``proj_basis``.
    ``svd="randomized"`` takes the randomized SVD instead (``svd_oversample``,
    ``svd_niter``)."""

    name = "galore"
    defaults = dict(SVD_DEFAULTS)
    param_dtype_state_keys = frozenset({"proj_basis"})
    basis_key = "proj_basis"
    refresh_on_owner = True

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        validate_svd_keys(group)

    def refresh(self, state: dict, group: dict, grad: Tensor, side: Side) -> None:
        basis = refreshed_basis(state, grad, group["rank"], side, group)
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
