"""Several ranks: FSDP2-sharded parameters stepped shard-locally, refreshes dealt out to
one owner rank per matrix, sharded state in DCP checkpoints, layer-wise DDP.

This layer sits above ``optim/``: the step engine reaches sharded parameters only through
the adapter registered here (``optim.sharded``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..optim import sharded as _sharded
from . import fsdp, refresh, state
from .sharding import _DTENSOR

if TYPE_CHECKING:
    from torch import Tensor

    from ..optim.base import SubspaceOptimizer


class _FSDP2(_sharded.ShardedParameters):
    """FSDP2's DTensors (``fsdp``, ``state``, ``refresh``)."""

    types = (_DTENSOR,) if _DTENSOR is not None else ()

    def prepare(self, opt: SubspaceOptimizer, p: Tensor, group: dict, grad: Tensor):
        return fsdp.prepare(opt, p, group, grad)

    def local_rule_shape(self, opt, p, group, shape):
        return fsdp.local_rule_shape(opt, p, group, shape)

    def present(self, opt, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state.present(opt, state_dict)

    def localize(self, opt, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state.localize(opt, state_dict)

    def after_load(self, opt) -> None:
        state.requantize(opt)

    def precompute_refreshes(self, opt) -> None:
        refresh.precompute(opt)

    def discard_refreshes(self) -> None:
        refresh.discard()


_sharded.register(_FSDP2())
