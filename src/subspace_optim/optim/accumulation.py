"""Gradient accumulation in the subspace, for updates made inside backward.

A projected parameter's accumulation window keeps the *projected* gradient (``r x n`` or
``m x r``) in its state, ``window_grad``: the window's first micro-batch fixes the subspace
(a due refresh happens there), every micro-batch adds its projection, and the full gradient
never outlives its hook. ``subspace_optim.step_in_backward`` and Grass's sparse layer
(``nn.GrassLinear``, which forms only the projected rows) use these functions through the
optimizer's public methods ``accumulate``, ``add_projected_gradient`` and ``take_window``.

A non-finite micro-batch (with ``skip_nonfinite``) spoils its whole window: nothing is
projected or refreshed from it, and the window's step is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..projectors.base import get_projector, matrix_shape, projected_shape, resolve_side
from . import lifecycle

if TYPE_CHECKING:
    from .base import SubspaceOptimizer

WINDOW_KEYS = ("window_grad", "window_refreshed", "window_skip")


def accumulate(opt: SubspaceOptimizer, p: Tensor, grad: Tensor, group: dict,
               start: bool) -> None:
    state = opt.state[p]
    if start:
        state.pop("window_skip", None)
    if state.get("window_skip") or opt._skips_nonfinite(group, grad):
        state.pop("window_grad", None)
        state["window_skip"] = True
        return
    projector = get_projector(group["projector"])
    shape = matrix_shape(p.shape)
    g = grad.reshape(shape)
    side = resolve_side(shape, group["proj_type"])
    if "step" not in state:
        projector.init_state(state, group, opt._param_index(p))
        state["step"] = 0
    due = start and projector.needs_refresh(state, group, state["step"])
    specs = opt._moment_specs(projected_shape(shape, group["rank"], side), group)
    _, low = lifecycle.project(projector, state, group, g, side, due, specs,
                               opt.reprojectable_moments,
                               opt.refresh_observer(p, state["step"], group) if due else None)
    if start:
        state["window_grad"] = low  # a new tensor: projections never alias grad
        state["window_refreshed"] = due
    else:
        state["window_grad"].add_(low)


def add_projected(opt: SubspaceOptimizer, p: Tensor, low: Tensor) -> None:
    state = opt.state[p]
    if "window_grad" in state:
        state["window_grad"].add_(low)
    else:
        state["window_grad"] = low
        state["window_refreshed"] = False


def take(opt: SubspaceOptimizer, p: Tensor) -> tuple[Tensor, bool] | None:
    state = opt.state[p]
    if state.pop("window_skip", False):
        state.pop("window_grad", None)
        state.pop("window_refreshed", None)
        return None
    return state.pop("window_grad"), state.pop("window_refreshed")
