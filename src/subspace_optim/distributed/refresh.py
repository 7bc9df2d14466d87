"""Subspace refreshes with several ranks: one owner rank per matrix computes it, a broadcast
hands the result to the others.

Under DDP and FSDP2 every rank holds the same reduced gradient of a matrix (FSDP2: spread
over the ranks' rows), so every rank could compute the same SVD. For projectors whose
refresh is costly (an SVD, or DCT's scoring of every basis column) the refreshes due in a
step are instead dealt out round-robin: rank ``k`` computes those of the matrices
``k, k + world, ...`` from the whole gradient (all-gathered first under FSDP2), then each
owner broadcasts the new projector state (the ``proj_*`` entries) and every rank installs
it, so bases are identical on every rank by construction. The measurement that chose this
(refresh time of replicated SVDs against owners and broadcasts) is in the README;
``SUBSPACE_OPTIM_REFRESH=replicated`` switches back to computing every refresh on every
rank.

Only ``optimizer.step()`` deals refreshes out; layer-wise mode under DDP steps each
parameter in its gradient bucket's hook, where the matrices of other buckets are not ready,
so there every rank computes its refreshes itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor

from ..optim import lifecycle
from ..optim.targets import target_of
from ..projectors.base import get_projector, matrix_shape, resolve_side
from .sharding import gather_rows, is_dtensor, local, row_shard, world_size

if TYPE_CHECKING:
    from ..optim.base import SubspaceOptimizer

STRATEGIES = ("owner", "replicated")


def strategy() -> str:
    value = os.environ.get("SUBSPACE_OPTIM_REFRESH", "owner")
    if value not in STRATEGIES:
        raise ValueError(f"SUBSPACE_OPTIM_REFRESH={value!r}: expected one of {STRATEGIES}")
    return value


def _due(opt: SubspaceOptimizer) -> list[tuple[Tensor, dict, Any, Tensor]]:
    """``(parameter, group, projector, gradient)`` of the costly refreshes of this step, in
    the optimizer's order (the same on every rank)."""
    due = []
    for group in opt.param_groups:
        if "rank" not in group:
            continue
        projector = get_projector(group["projector"])
        if not projector.refresh_on_owner:
            continue
        for p in group["params"]:
            grad = target_of(p).grad(p)
            if grad is None or not opt.projects(p, group):
                continue
            state = opt.state[p]
            probe = state
            if "step" not in state:
                probe = {}
                projector.init_state(probe, group, opt._param_index(p))
            if projector.needs_refresh(probe, group, state.get("step", 0)):
                due.append((p, group, projector, grad))
    return due


def _whole(p: Tensor, grad: Tensor) -> Tensor:
    """The gradient as the projector's matrix, gathered from the shards under FSDP2 (a
    collective: every rank calls it, for every due matrix, in the same order)."""
    shape = matrix_shape(p.shape)
    if is_dtensor(p):
        shard = row_shard(p)
        return gather_rows(local(grad).reshape(shard.rows, shape[1]), shard, shape)
    return grad.reshape(shape)


def precompute(opt: SubspaceOptimizer) -> None:
    """Compute this step's costly refreshes on their owners and broadcast them; each
    parameter's refresh in the step then installs the result (``lifecycle.refresh``)."""
    if world_size() <= 1 or strategy() != "owner":
        return
    due = _due(opt)
    if not due:
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    owned = {}
    for i, (p, group, projector, grad) in enumerate(due):
        whole = _whole(p, grad)
        if i % world != rank:
            continue
        state = opt.state[p]
        scratch = dict(state)
        if "step" not in state:
            projector.init_state(scratch, group, opt._param_index(p))
        side = resolve_side(tuple(whole.shape), group["proj_type"])
        # Refreshes assign new tensors (the projector contract), so the scratch copy leaves
        # the live state untouched.
        projector.refresh(scratch, group, whole, side)
        owned[i] = {k: v for k, v in scratch.items() if k.startswith("proj_")}
    for i, (p, _, _, _) in enumerate(due):
        owner = i % world
        box = [_to_host(owned.get(i))]
        dist.broadcast_object_list(box, src=owner)
        device = local(p).device
        lifecycle.computed[id(opt.state[p])] = {
            k: v.to(device) if isinstance(v, Tensor) and k not in _host_keys(opt, p) else v
            for k, v in box[0].items()}


def _to_host(entries: dict | None) -> dict | None:
    """CPU copies for the pickled broadcast (a CUDA tensor would unpickle onto the owner's
    device index on every rank)."""
    if entries is None:
        return None
    return {k: v.cpu() if isinstance(v, Tensor) else v for k, v in entries.items()}


def _host_keys(opt: SubspaceOptimizer, p: Tensor) -> frozenset[str]:
    return opt.host_state_keys([opt.group_of(p)])


def discard() -> None:
    """Forget results a step did not consume (a parameter skipped for a non-finite
    gradient)."""
    lifecycle.computed.clear()

