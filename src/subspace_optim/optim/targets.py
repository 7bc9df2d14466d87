"""Target adapters: where a parameter's gradient comes from and where its update lands.

A plain parameter is its own target: the gradient is ``p.grad`` and the update goes into
``p``. A layer that stores its weight in another form (``subspace_optim.nn.Int8Linear``:
uint8 codes that cannot hold a float gradient) attaches its own adapter to the weight as
``p.subspace_target``; the optimizer asks it for the gradient, for a float tensor to update,
and to store that tensor back. That is how the optimizers serve such layers without
importing them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


class Target:
    """The adapter of a plain parameter; layers subclass it (see the module docstring)."""

    def grad(self, p: Tensor) -> Tensor | None:
        return p.grad

    def release_grad(self, p: Tensor) -> None:
        """Free the gradient once it has been used (layer-wise mode)."""
        p.grad = None

    def weight(self, p: Tensor) -> Tensor:
        """The float tensor the update is applied to, in place."""
        return p

    def init_state(self, p: Tensor, state: dict, param_index: int) -> None:
        """Called before the parameter's first update (e.g. a seed for rounding)."""

    def commit(self, p: Tensor, weight: Tensor, state: dict, step: int) -> None:
        """Called after the update of ``weight`` (what :meth:`weight` returned) at ``step``."""

    def register_grad_hook(self, p: Tensor, hook: Callable[[Tensor], None]) -> Any:
        """Call ``hook(grad)`` once the parameter's gradient is accumulated (layer-wise
        mode); returns a handle with ``remove()``."""
        return p.register_post_accumulate_grad_hook(
            lambda q: hook(q.grad) if q.grad is not None else None)

    def zero_grad(self, p: Tensor) -> None:
        """What ``optimizer.zero_grad()`` does besides torch's own clearing of ``p.grad``."""


PARAMETER = Target()


def target_of(p: Tensor) -> Target:
    return getattr(p, "subspace_target", PARAMETER)


def held_outside_grad(params) -> list[Tensor]:
    """The gradients of ``params`` that live outside ``.grad`` (an INT8 weight's)."""
    out = []
    for p in params:
        target = target_of(p)
        if target is not PARAMETER:
            grad = target.grad(p)
            if grad is not None:
                out.append(grad)
    return out
