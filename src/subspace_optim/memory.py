"""Measured memory: the figures every memory claim of the library is built from."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Total bytes of every tensor held in ``optimizer.state`` (moments, bases, indices,
    seeds, quantisation scales...), counted from the tensors themselves."""
    return sum(_tensor_bytes(state) for state in optimizer.state.values())
