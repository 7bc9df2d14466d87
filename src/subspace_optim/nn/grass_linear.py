"""Grass's compute path: a linear layer whose backward forms only the weight-gradient rows
(or columns) that the Grass projector selects (Muhamed et al. 2024, section 3).

With ``G = dY^T X`` (``m x n``) and selected rows ``idx`` with scales ``rho``, the projected
gradient is ``rho * dY[:, idx]^T X`` (``r x n``): the weight-gradient matmul and its memory
drop from ``m x n`` to ``r x n`` (columns: ``rho * dY^T X[:, idx]``, ``m x r``). The layer
reads ``idx`` and ``rho`` from the optimizer's state for its weight, so both always agree, and
hands the result to the optimizer's window accumulator; the weight's ``.grad`` stays None.

When the optimizer is about to refresh the selection (its first step, or a step with
``step % update_proj_gap == 0``), norm-based selection needs the full gradient, so that
backward produces the dense gradient as an ordinary layer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..projectors.base import Side, get_projector, resolve_side


class _SparseGradLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, module: GrassLinear):
        ctx.module = module
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        module = ctx.module
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        grad_b = out_2d.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if module.wants_dense_gradient():
                grad_w = out_2d.T @ x_2d
            else:
                module.deliver_rows(out_2d, x_2d)
        return grad_x, grad_w, grad_b, None


class GrassLinear(nn.Module):
    """Wraps an ``nn.Linear`` (its parameters are the wrapped layer's); call :meth:`bind` with
    the optimizer, whose group for the weight must use the ``grass`` projector."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self._optimizer = None

    def bind(self, optimizer) -> GrassLinear:
        group = next((g for g in optimizer.param_groups
                      if any(p is self.linear.weight for p in g["params"])), None)
        if group is None:
            raise ValueError("GrassLinear.bind: the layer's weight is not in this optimizer")
        if group.get("projector") != "grass" or "rank" not in group:
            raise ValueError(
                "GrassLinear.bind: the weight's group must be projected with "
                f"projector='grass' (got projector={group.get('projector')!r})"
            )
        self._optimizer = optimizer
        return self

    def _group(self) -> dict:
        return next(g for g in self._optimizer.param_groups
                    if any(p is self.linear.weight for p in g["params"]))

    def wants_dense_gradient(self) -> bool:
        """Dense when unbound, before the first selection, or when this backward begins a
        step (or accumulation window) that will refresh the selection."""
        if self._optimizer is None:
            return True
        state = self._optimizer.state.get(self.linear.weight, {})
        if "proj_indices" not in state:
            return True
        group = self._group()
        due = get_projector("grass").needs_refresh(state, group, state.get("step", 0))
        return due and state.get("micro_step", 0) == 0

    def deliver_rows(self, grad_out: Tensor, x: Tensor) -> None:
        """Form the selected rows (columns) of the weight gradient, scaled, and hand them over."""
        weight = self.linear.weight
        state = self._optimizer.state[weight]
        group = self._group()
        idx = state["proj_indices"].int()
        scales = state["proj_scales"].to(grad_out.dtype)
        side = resolve_side(tuple(weight.shape), group["proj_type"])
        if side == Side.LEFT:
            low = (grad_out.index_select(1, idx).T @ x) * scales[:, None]
        else:
            low = (grad_out.T @ x.index_select(1, idx)) * scales[None, :]
        self._optimizer.add_projected_gradient(weight, low)
        stepper = self._optimizer._backward_stepper
        if stepper is not None:
            stepper.on_projected_gradient(weight)

    def forward(self, x: Tensor) -> Tensor:
        return _SparseGradLinearFunction.apply(x, self.linear.weight, self.linear.bias, self)
