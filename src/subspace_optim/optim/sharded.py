"""How the step engine sees parameters whose layout another layer owns (FSDP2's DTensors,
sharded over ranks): through an adapter that layer registers. ``subspace_optim.distributed``
registers its own when it is imported (``import subspace_optim`` does), so ``optim/`` never
imports ``distributed/``: the layers point one way.

Without a registered adapter no parameter is sharded and there is one rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .base import SubspaceOptimizer
    from .engine import Item


def world_size() -> int:
    """The number of ranks of the default process group (1 when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


class ShardedParameters:
    """What the engine asks of sharded parameters; the base answers for none."""

    # The tensor types that are sharded parameters (isinstance, checked for every parameter
    # of every step: a tuple, not a method call).
    types: tuple[type, ...] = ()

    def prepare(self, opt: SubspaceOptimizer, p: Tensor, group: dict,
                grad: Tensor) -> Item | None:
        """The step's item of sharded parameter ``p`` (or ``None`` when skipped)."""
        raise NotImplementedError

    def local_rule_shape(self, opt: SubspaceOptimizer, p: Tensor, group: dict,
                         shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this rank's moments of global ``shape`` have."""
        return shape

    def present(self, opt: SubspaceOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The state dict as ``state_dict()`` returns it (sharded moments as global)."""
        return state_dict

    def localize(self, opt: SubspaceOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A loaded state dict, as this rank keeps it."""
        return state_dict

    def after_load(self, opt: SubspaceOptimizer) -> None:
        """Called once a state dict has been loaded."""

    def precompute_refreshes(self, opt: SubspaceOptimizer) -> None:
        """Before a step with refreshes: compute those this rank owns and share them."""

    def discard_refreshes(self) -> None:
        """After that step: drop what was shared and not used."""


_adapter = ShardedParameters()


def register(adapter: ShardedParameters) -> None:
    global _adapter
    _adapter = adapter


def adapter() -> ShardedParameters:
    return _adapter


def is_sharded(t: Any) -> bool:
    types = _adapter.types
    return bool(types) and isinstance(t, types)
