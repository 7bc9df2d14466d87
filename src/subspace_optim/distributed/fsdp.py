"""A step's item for a parameter sharded by FSDP2: what each rank computes and communicates.

Rank k holds rows ``[a, b)`` of the ``m x n`` matrix ``W`` and of its (reduce-scattered)
gradient ``G``. The rule of the optimizer decides how an item is formed:

* **Shard-local rules** (AdamW, Lion: elementwise in the subspace). A full-rank parameter
  updates its own rows with moments of its rows. A projected one keeps the basis
  replicated and:

  - right side (basis ``B``: ``r x n``; moments ``m x r``): ``R_k = G_k B^T`` and
    ``W_k += N_k B`` are row-local, so moments are sharded like the weight and a step
    communicates nothing;
  - left side (basis ``B``: ``m x r``; moments ``r x n``): ``B^T G = sum_k B_k^T G_k``, one
    all-reduce of ``r x n`` per step; moments are replicated, and ``W_k += B_k N`` is local
    with the basis rows ``B_k`` (a dense ``m_k x r`` slice; sparse, packed or generated
    bases are expanded for the slice).

* **Rules that reduce across rows** (Adafactor's factored second moments and update
  clipping): the item is the single-process one on gathered tensors, computed alike on
  every rank, and each rank writes back its rows. State is replicated.

A refresh computes the basis from the whole gradient (an all-gather of ``m x n``), on every
rank, by the projector's single-process code, so every rank holds the same basis bit for
bit without a broadcast (see the README for the measured alternative). Projectors that
learn their basis from every gradient (OSD) gather it at every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..optim import lifecycle
from ..optim.engine import Item, as_matrix
from ..optim.targets import PARAMETER, Target
from ..projectors.base import (
    MatrixProjector,
    Projector,
    Side,
    get_projector,
    matrix_shape,
    resolve_side,
)
from .sharding import RowShard, all_ranks_agree, all_reduce_sum, gather_rows, local, row_shard

if TYPE_CHECKING:
    from ..optim.base import SubspaceOptimizer

DENSE = MatrixProjector()  # the left side's basis rows are a dense slice


class GatheredTarget(Target):
    """The update lands in a gathered copy of the whole parameter; each rank stores its
    rows back (rules that reduce across rows)."""

    def __init__(self, shard: RowShard) -> None:
        self.shard = shard

    def commit(self, p: Tensor, weight: Tensor, state: dict, step: int) -> None:
        own = weight.reshape(p.shape)[self.shard.offset:self.shard.offset + self.shard.rows]
        local(p).copy_(own)


def layout(opt: SubspaceOptimizer, p: Tensor, group: dict) -> str:
    """Where ``p``'s rule state lives: ``"rows"`` (sharded like the weight), or
    ``"replicated"`` (the same on every rank)."""
    if not opt.shard_local_rule:
        return "replicated"
    if not opt.projects(p, group):
        return "rows"
    side = resolve_side(matrix_shape(p.shape), group["proj_type"])
    return "rows" if side == Side.RIGHT else "replicated"


def local_rule_shape(opt: SubspaceOptimizer, p: Tensor, group: dict,
                     shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape this rank's state of global ``shape`` has (``shape`` for replicated)."""
    if layout(opt, p, group) == "replicated":
        return shape
    return row_shard(p).local_shape(shape)


def _learns_online(projector: Projector) -> bool:
    return type(projector).after_update is not Projector.after_update


def _left_rows(projector: Projector, basis, shard: RowShard, m: int, rank: int,
               like: Tensor) -> Tensor:
    """Rows ``[a, b)`` of the left basis as a dense ``m_k x r`` matrix."""
    if isinstance(basis, Tensor):
        return basis[shard.offset:shard.offset + shard.rows]
    # W += B N with N = I gives B: the projector's own back-projection, any basis kind.
    dense = like.new_zeros((m, rank))
    eye = torch.eye(rank, dtype=like.dtype, device=like.device)
    projector.update_weight_(basis, eye, Side.LEFT, dense, 1.0)
    return dense[shard.offset:shard.offset + shard.rows]


def prepare(opt: SubspaceOptimizer, p: Tensor, group: dict, grad: Tensor) -> Item | None:
    """The item of sharded parameter ``p`` (see the module docstring), or ``None`` when
    ``skip_nonfinite`` skips it (decided alike on every rank)."""
    shard = row_shard(p)
    grad_local = local(grad)
    opt._check_grad(p, grad_local)
    if group["skip_nonfinite"]:
        finite = all_ranks_agree(bool(torch.isfinite(grad_local).all()), shard,
                                 grad_local.device)
        if not finite:
            opt._nonfinite_skips += 1
            return None
    state = opt.state[p]
    first = "step" not in state
    step = state.get("step", 0)
    weight_local = local(p)
    gathered = not opt.shard_local_rule
    if not opt.projects(p, group):
        if first:
            state["step"] = 0
        if gathered:
            weight, g = gather_rows(weight_local, shard, tuple(p.shape)), \
                gather_rows(grad_local, shard, tuple(p.shape))
            target = GatheredTarget(shard)
        else:
            weight, g, target = weight_local, grad_local, PARAMETER
        specs = opt._moment_specs(tuple(g.shape), group)
        return Item(p, state, target, weight, weight, False, g, g, None, None, False, step,
                    False, specs)

    shape = matrix_shape(p.shape)
    m, n = shape
    side = resolve_side(shape, group["proj_type"])
    projector = get_projector(group["projector"])
    if first:
        projector.init_state(state, group, opt._param_index(p))
        state["step"] = 0
    rank = group["rank"]
    due = projector.needs_refresh(state, group, step)
    g_local = grad_local.reshape(shard.rows, n)
    full = gather_rows(g_local, shard, shape) if (due or gathered or _learns_online(projector)) \
        else None
    if gathered:
        specs = opt._moment_specs((m, rank) if side == Side.RIGHT else (rank, n), group)
        basis, low = lifecycle.project(projector, state, group, full, side, due, specs,
                                       opt.reprojectable_moments,
                                       opt.refresh_observer(p, step, group) if due else None)
        weight = gather_rows(weight_local.reshape(shard.rows, n), shard, shape)
        return Item(p, state, GatheredTarget(shard), weight, weight, False, full, low, basis,
                    side, due, step, True, specs, projector=projector)

    matrix, copy_back = as_matrix(weight_local, (shard.rows, n))
    local_low = (shard.rows, rank) if side == Side.RIGHT else (rank, n)
    specs = opt._moment_specs(local_low, group)
    if due:
        # Stored moments are this rank's rows (right) or replicated (left); the projector's
        # transition acts row by row on the right, so it runs on them as they are.
        basis, low = lifecycle.refresh(projector, state, group, full, side, specs,
                                       opt.reprojectable_moments,
                                       opt.refresh_observer(p, step, group))
        if side == Side.RIGHT:
            low = low[shard.offset:shard.offset + shard.rows]
    else:
        # The basis depends on the matrix's shape only: a stand-in of that shape, no data.
        basis = projector.basis(state, group, g_local.new_empty(()).expand(m, n), side)
        low = None
    item_projector, item_basis = projector, basis
    if side == Side.LEFT:
        item_basis = _left_rows(projector, basis, shard, m, rank, g_local)
        item_projector = DENSE
        if low is None:
            low = all_reduce_sum(DENSE.project(item_basis.to(g_local.dtype), g_local, side),
                                 shard)
    elif low is None:
        low = projector.project(basis, g_local, side)
    return Item(p, state, PARAMETER, weight_local, matrix, copy_back,
                full if full is not None else g_local, low, item_basis, side, due, step, True,
                specs, projector=item_projector)
