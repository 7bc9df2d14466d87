"""Flora's random projection (Hao et al., "Flora: Low-Rank Adapters Are Secretly Gradient
Compressors", ICML 2024, arXiv 2402.03293; reference code BorealisAI/flora-opt).

No matrix is stored: the projection ``A ~ N(0, 1/r)`` is regenerated on the parameter's
device from a per-parameter integer seed, held in the state as an int64 CPU tensor
(``proj_seed``, 8 bytes). The seed starts at ``seed + index`` (1-based index of the
parameter in the optimizer) and advances every ``update_proj_gap`` steps (Flora's kappa,
default 1000) by Flora's own rule, so the subspace is resampled.

Orientation is Flora's: for ``m < n`` (left side) ``A`` is ``r x m`` and ``down(X) = A X``;
otherwise ``A`` is ``n x r`` and ``down(X) = X A``; ``up`` multiplies by ``A^T``. ``A`` is not
orthonormal, but ``E[A^T A] = I`` so the compression is unbiased.

At a resample the moments move to the new subspace, ``m <- down_new(up_old(m))``. The same
move applied to Adam's second moment can make it negative (flora-opt issue #7: a random
projection mixes coordinates with signs), and ``sqrt(v)`` would then be NaN. Here the moved
second moment is taken in absolute value, ``v <- |down_new(up_old(v))|`` (the optimizer's
re-projection policy for non-negative moments), which keeps it a valid scale estimate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validate import check_seed
from .base import REPROJECT, MatrixProjector, register_projector
from .seeds import next_seed, seed_tensor, split_seed


def flora_basis(
    seed: int, shape: tuple[int, int], rank: int, side: str, device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """The projection for ``seed`` as a dense basis: ``A^T`` (``m x r`` left, ``r x n`` right)."""
    left_seed, right_seed = split_seed(seed)
    m, n = shape
    a_shape = (rank, m) if side == "left" else (n, rank)
    gen = torch.Generator(device=device).manual_seed(left_seed if side == "left" else right_seed)
    a = torch.randn(a_shape, generator=gen, device=device, dtype=dtype) / math.sqrt(rank)
    return a.T


class FloraProjector(MatrixProjector):
    """Seeded Gaussian projection resampled every ``update_proj_gap`` steps; state ``proj_seed``."""

    name = "flora"
    group_defaults = {"update_proj_gap": 1000, "scale": 1.0, "proj_type": "std", "seed": 0}
    host_state_keys = frozenset({"proj_seed"})

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_seed(group)

    def moment_policy(self, group: dict) -> str:
        return REPROJECT

    def init_state(self, state: dict, param_index: int, group: dict) -> None:
        state["proj_seed"] = seed_tensor(group["seed"] + param_index)

    def needs_refresh(self, state: dict, step: int, group: dict) -> bool:
        return step > 0 and step % group["update_proj_gap"] == 0

    def refresh(self, state: dict, grad: Tensor, side: str, group: dict) -> None:
        state["proj_seed"] = seed_tensor(next_seed(int(state["proj_seed"])))
        return None

    def basis(self, state: dict, side: str, grad: Tensor, group: dict) -> Tensor:
        return flora_basis(int(state["proj_seed"]), tuple(grad.shape), group["rank"], side,
                           grad.device, grad.dtype)


register_projector(FloraProjector())
