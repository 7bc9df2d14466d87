"""What a rank holds of a sharded parameter, and the collectives that move between the
shard and the whole.

FSDP2 (``torch.distributed.fsdp.fully_shard``) makes every parameter a DTensor sharded on
its first dimension over a 1-D device mesh (``Shard(0)``, torch.chunk's split: ranks hold
``ceil(rows / world)`` rows, the last ones fewer or none). A parameter of more than two
dimensions is projected as the matrix ``(shape[0], prod(shape[1:]))``, so a rank's shard is
a block of that matrix's rows too. Other layouts (a 2-D mesh, sharding on another
dimension) are refused with the placement named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.sharded import world_size  # noqa: F401 (this layer's name for it)


def _dtensor_class() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


_DTENSOR = _dtensor_class()


def is_dtensor(t: Any) -> bool:
    # Asked for every parameter of every step: the class is looked up once, at import.
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


@dataclass(frozen=True)
class RowShard:
    """The block of rows ``[offset, offset + rows)`` of a parameter of ``global_shape`` that
    this rank holds, on ``mesh`` (1-D) with the placements ``(Shard(0),)``."""

    mesh: Any
    global_shape: tuple[int, ...]
    offset: int
    rows: int

    @property
    def group(self) -> Any:
        return self.mesh.get_group()

    @property
    def world(self) -> int:
        return self.mesh.size()

    def local_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``shape`` (global, first dimension the parameter's rows) with this rank's rows."""
        return (self.rows, *shape[1:])


def row_shard(p: Tensor) -> RowShard:
    """The shard of DTensor ``p`` held here; ``ValueError`` for a layout that is not rows
    over a 1-D mesh."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = p.device_mesh, tuple(p.placements)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise ValueError(
            f"a sharded parameter of shape {tuple(p.shape)} has placements {placements} on a "
            f"{mesh.ndim}-D mesh; subspace_optim supports FSDP2's layout, (Shard(0),) on a "
            "1-D mesh (fully_shard without a 2-D HSDP mesh or tensor parallelism)")
    local, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return RowShard(mesh, tuple(p.shape), int(offset[0]), int(local[0]))


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the same storage: in-place updates land in it)."""
    return t._local_tensor if is_dtensor(t) else t


def as_dtensor(local_tensor: Tensor, shard: RowShard, shape: tuple[int, ...]) -> Tensor:
    """``local_tensor`` (this rank's rows of a tensor of ``shape``) as a DTensor sharded like
    the parameter, sharing its storage."""
    from torch.distributed.tensor import DTensor, Shard

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_tensor, shard.mesh, (Shard(0),), run_check=False,
                              shape=torch.Size(shape), stride=stride)


def gather_rows(local_tensor: Tensor, shard: RowShard, shape: tuple[int, ...]) -> Tensor:
    """The whole tensor of ``shape`` whose rows are spread over the ranks as ``shard`` says
    (an all-gather; ``local_tensor`` holds this rank's rows)."""
    return as_dtensor(local_tensor.contiguous(), shard, shape).full_tensor()


def all_reduce_sum(t: Tensor, shard: RowShard) -> Tensor:
    dist.all_reduce(t, group=shard.group)
    return t


def all_ranks_agree(ok: bool, shard: RowShard, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (a decision all ranks must take alike)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=shard.group)
    return bool(flag.item() == 1.0)
