"""Flora's random projection (Hao et al., "Flora: Low-Rank Adapters Are Secretly Gradient
Compressors", ICML 2024, arXiv 2402.03293; reference code BorealisAI/flora-opt).

No matrix is stored: the projection, Gaussian with variance ``1/r``, is regenerated on the
parameter's device from a per-parameter integer seed, held in the state as an int64 CPU
tensor (``proj_seed``, 8 bytes). The seed starts at ``seed + index`` (1-based index of the
parameter in the optimizer) and advances every ``update_proj_gap`` steps (Flora's kappa,
default 1000) by Flora's own rule, so the subspace is resampled.

The matrix is a counter-based function of (seed, row, column) (``subspace_optim.counter_rng``:
element ``(i, j)`` of the dense basis is the normal drawn for counter ``i * cols + j``), not
the output of a ``torch.Generator``. That lets a kernel generate it tile by tile inside the
projection without ever materialising it, and a compiled step read no seed on the host;
both paths produce the same matrix. (Before this definition the matrix came from
``torch.randn`` with a seeded generator, as in flora-opt: the same distribution, other
numbers.)

Orientation is Flora's: for ``m < n`` (left side) the basis is ``m x r`` and ``down(X) =
B^T X``; otherwise it is ``r x n`` and ``down(X) = X B^T``; ``up`` multiplies by ``B``. It is
not orthonormal, but ``E[up(down(X))] = X``, so the compression is unbiased.

At a resample the moments move to the new subspace, ``m <- down_new(up_old(m))``. The same
move applied to Adam's second moment can make it negative (flora-opt issue #7: a random
projection mixes coordinates with signs), and ``sqrt(v)`` would then be NaN. Here the moved
second moment is taken in absolute value, ``v <- |down_new(up_old(v))|`` (the optimizer's
re-projection policy for non-negative moments), which keeps it a valid scale estimate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import ops
from .._validate import check_seed
from ..ops.flora import flora_basis
from .base import REPROJECT, MatrixProjector, Projector, Side, register_projector
from .seeds import next_seed, seed_tensor


class SeededBasis(NamedTuple):
    """Flora's transient basis: the seed it is generated from, the matrix's shape, the rank
    and the dtype it is generated in."""

    seed: Tensor
    shape: tuple[int, int]
    rank: int
    dtype: torch.dtype

    def dense(self, side: Side, device: torch.device) -> Tensor:
        return flora_basis(self.seed, self.shape, self.rank, side == Side.RIGHT, device,
                           self.dtype)


# The dense products, for a generated basis (the PyTorch path).
_DENSE = MatrixProjector()


class FloraProjector(Projector):
    """Seeded Gaussian projection resampled every ``update_proj_gap`` steps; state ``proj_seed``."""

    name = "flora"
    defaults = {"update_proj_gap": 1000, "scale": 1.0, "seed": 0}
    host_state_keys = frozenset({"proj_seed"})

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_seed(group)

    def moment_policy(self, group: dict) -> str:
        return REPROJECT

    def init_state(self, state: dict, group: dict, param_index: int) -> None:
        state["proj_seed"] = seed_tensor(group["seed"] + param_index)

    def refresh(self, state: dict, group: dict, grad: Tensor, side: Side) -> None:
        state["proj_seed"] = seed_tensor(next_seed(int(state["proj_seed"])))
        return None

    def basis(self, state: dict, group: dict, grad: Tensor, side: Side) -> Tensor | SeededBasis:
        """With the PyTorch implementation the matrix is generated once per step and used as
        a dense basis; a kernel generates it inside each product instead (never stored)."""
        seeded = SeededBasis(state["proj_seed"], tuple(grad.shape), group["rank"], grad.dtype)
        if ops.backend("flora_project", grad.device) == "torch":
            return seeded.dense(side, grad.device)
        return seeded

    def project(self, basis: Tensor | SeededBasis, grad: Tensor, side: Side) -> Tensor:
        if isinstance(basis, Tensor):
            return _DENSE.project(basis, grad, side)
        return ops.flora_project(grad, basis.seed, basis.rank, side == Side.RIGHT)

    def project_back(self, basis: Tensor | SeededBasis, low: Tensor, side: Side) -> Tensor:
        dense = basis if isinstance(basis, Tensor) else basis.dense(side, low.device)
        return _DENSE.project_back(dense.to(low.dtype), low, side)

    def reproject(self, old_basis: Tensor | SeededBasis, new_basis: Tensor | SeededBasis,
                  moment: Tensor, side: Side) -> Tensor:
        # At the moment's precision (it may exceed the weight's: state_bits=32, bf16).
        back = self.project_back(old_basis, moment, side).to(moment.dtype)
        if isinstance(new_basis, Tensor):
            return _DENSE.project(new_basis.to(moment.dtype), back, side)
        return self.project(new_basis, back, side)

    def update_weight_(self, basis: Tensor | SeededBasis, low: Tensor, side: Side,
                       weight: Tensor, alpha: float, beta: float = 1.0) -> None:
        if isinstance(basis, Tensor):
            _DENSE.update_weight_(basis, low, side, weight, alpha, beta)
        else:
            ops.flora_project_back_(weight, low, basis.seed, side == Side.RIGHT, alpha, beta)


register_projector(FloraProjector())
