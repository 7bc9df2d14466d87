"""Grass: structured sparse projection by row selection (Muhamed et al., "Grass: Compute
Efficient Low-Memory LLM Training with Structured Sparse Gradients", EMNLP 2024,
arXiv 2406.17660). No public code exists; this follows the paper.

The projection is ``P^T = rho B`` with ``B`` selecting ``rank`` rows of the gradient (columns
on the right side) and ``rho`` a diagonal scaling, so the state is ``rank`` int16 indices
(int32 past 32767) and ``rank`` float32 scales. Projection is a gather, back-projection a
scatter-add into the selected rows; no dense 0/1 matrix is ever formed. The moments are
reset at each refresh.

``selection`` (group key):

* ``"topk"``: the rows of largest norm, ``rho = 1``.
* ``"multinomial"``: rows drawn without replacement with inclusion probability
  ``pi_i = min(1, c ||g_i||^2)``, ``sum pi = rank`` (systematic sampling), scaled by
  ``1 / sqrt(pi_i)``, which is ``1 / sqrt(r q_i)`` with ``q_i = ||g_i||^2 / ||G||^2`` when no
  row is capped. Then ``E[P P^T G] = G`` exactly. (Drawing ``r`` times from the categorical
  ``q`` without replacement would not be unbiased with that scaling: its inclusion
  probabilities are not ``r q_i``.)
* ``"uniform"``: ``rank`` distinct rows uniformly, ``rho = sqrt(d / r)``, also unbiased.

Random draws use a per-parameter seed in the state (``proj_seed``, advanced at every
refresh), so a resumed run draws the same rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import ops
from .._validate import check_choice, check_seed
from .base import RESET, Projector, Side, index_dtype, register_projector, working_dtype
from .sampling import inclusion_probabilities, systematic_sample
from .seeds import next_seed, seed_tensor

SELECTIONS = ("topk", "multinomial", "uniform")


class RowSelection(NamedTuple):
    """Grass's transient basis: which rows (columns), their scales, and the full shape."""

    indices: Tensor
    scales: Tensor
    shape: tuple[int, int]


def select_rows(
    norms_sq: Tensor, rank: int, selection: str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Indices (sorted) and scales of the selected rows, given each row's squared norm."""
    d = norms_sq.numel()
    if selection == "topk":
        idx = torch.topk(norms_sq, rank).indices
        scales = torch.ones(rank, device=norms_sq.device)
    elif selection == "uniform":
        idx = torch.randperm(d, generator=generator, device=norms_sq.device)[:rank]
        scales = torch.full((rank,), (d / rank) ** 0.5, device=norms_sq.device)
    else:
        pi = inclusion_probabilities(norms_sq, rank)
        idx = systematic_sample(pi, rank, generator)
        scales = pi[idx].rsqrt().float()
    order = torch.argsort(idx)
    return idx[order].to(index_dtype(d)), scales[order].float()


def _row_norms_sq(grad: Tensor, side: Side) -> Tensor:
    """Each row's (left) or column's (right) squared norm, of the gradient divided by a
    power of two near its largest element: the same selection and probabilities (a power of
    two scales every norm exactly alike), and a gradient of 1e19 does not overflow float32
    when squared (its norms were inf, its probabilities NaN)."""
    g = grad.to(working_dtype(grad))
    if g.numel() and not g.is_meta:
        peak = g.abs().amax()
        _, exponent = torch.frexp(peak)
        factor = torch.ldexp(torch.ones((), dtype=g.dtype, device=g.device), -exponent)
        g = g * torch.where(torch.isfinite(peak) & (peak > 0), factor, torch.ones_like(factor))
    return g.pow(2).sum(dim=1 if side == "left" else 0)


class GrassProjector(Projector):
    """Row (or column) selection; state ``proj_indices`` (int16), ``proj_scales``, ``proj_seed``."""

    name = "grass"
    defaults = {"selection": "multinomial", "seed": 0}
    host_state_keys = frozenset({"proj_seed"})
    basis_key = "proj_indices"

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_choice(group, "selection", SELECTIONS)
        check_seed(group)

    def moment_policy(self, group: dict) -> str:
        return RESET

    def init_state(self, state: dict, group: dict, param_index: int) -> None:
        state["proj_seed"] = seed_tensor(group["seed"] + param_index)

    def refresh(self, state: dict, group: dict, grad: Tensor, side: Side) -> None:
        seed = next_seed(int(state["proj_seed"]))
        state["proj_seed"] = seed_tensor(seed)
        norms_sq = _row_norms_sq(grad, side)
        if grad.is_meta:
            # The memory planner (meta tensors): a selection of the right shapes and dtypes,
            # made on the host from a stand-in vector of norms.
            gen = torch.Generator().manual_seed(seed)
            idx, scales = select_rows(torch.ones(norms_sq.shape), group["rank"],
                                      group["selection"], gen)
            idx, scales = idx.to(grad.device), scales.to(grad.device)
        else:
            gen = torch.Generator(device=grad.device).manual_seed(seed)
            idx, scales = select_rows(norms_sq, group["rank"], group["selection"], gen)
        state["proj_indices"], state["proj_scales"] = idx, scales
        return None

    def basis(self, state: dict, group: dict, grad: Tensor, side: Side) -> RowSelection:
        # index_select / index_add_ take int32 or int64 indices; the state keeps int16.
        return RowSelection(state["proj_indices"].int(), state["proj_scales"], tuple(grad.shape))

    def project(self, basis: RowSelection, grad: Tensor, side: Side) -> Tensor:
        return ops.grass_gather(grad, basis.indices, basis.scales, side == Side.RIGHT)

    def project_back(self, basis: RowSelection, low: Tensor, side: Side) -> Tensor:
        out = low.new_zeros(basis.shape)
        self.update_weight_(basis, low, side, out, 1.0)
        return out

    def update_weight_(self, basis: RowSelection, low: Tensor, side: Side, weight: Tensor,
                       alpha: float, beta: float = 1.0) -> None:
        # A scatter into the selected rows; weight decay (beta) still touches every row.
        ops.grass_scatter_update_(weight, low, basis.indices, basis.scales, side == Side.RIGHT,
                                  alpha, beta)


register_projector(GrassProjector())
