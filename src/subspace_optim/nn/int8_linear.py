"""Linear layers whose weight is stored in INT8 (Q-GaLore's weight quantisation).

The weight is a uint8 ``nn.Parameter`` (codes, ``requires_grad=False``) with a float32 scale
and a uint8 zero-point per group of ``group_size`` consecutive elements (buffers, so they
are in the module's ``state_dict``). Forward and backward dequantise it on the fly; the
weight's gradient ``dY^T X`` is computed in the activations' floating dtype and accumulated,
across micro-batches, in ``module.weight_grad``, where the optimizers of this library read it (an
integer tensor cannot hold a float ``.grad``). The optimizer applies its update to the
dequantised weight and stores it back with stochastic rounding, so the stored weight
equals the exact update in expectation.

An autograd function runs its backward only if one of its inputs requires a gradient;
the first layer of a network sees raw data, and its weight is an integer tensor that cannot
require one. So while gradients are enabled each call also passes an empty tensor that
requires a gradient (an "anchor", freed with the graph), and the weight's gradient is
always computed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..optim.targets import Target
from ..quant.groupwise import dequantize_groupwise, quantize_groupwise


class _Int8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, anchor: Tensor | None,
                module: Int8Linear) -> Tensor:
        ctx.module = module
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x)
        return F.linear(x, module.dequantized_weight(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        module = ctx.module
        weight = module.dequantized_weight(grad_out.dtype)  # recomputed: nothing float kept
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        # In the activations' dtype, like any weight gradient (bf16 in bf16 training).
        grad_w = out_2d.T @ x.reshape(-1, x.shape[-1])
        module.weight_grad = grad_w if module.weight_grad is None else module.weight_grad + grad_w
        if module.weight_grad_hook is not None:  # stepping in backward
            module.weight_grad_hook(module.weight_grad)
        grad_b = out_2d.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x, grad_b, None, None


class Int8Linear(nn.Module):
    """``nn.Linear`` with a group-wise INT8 weight; build it with :meth:`from_linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 256, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        numel = in_features * out_features
        groups = -(-numel // group_size)
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        self.register_buffer("weight_scales", torch.ones(groups, device=device))
        self.register_buffer("weight_zeros", torch.zeros(groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) \
            if bias else None
        self.weight_grad: Tensor | None = None
        # Set by step_in_backward: called with the accumulated gradient after each backward,
        # the counterpart of a float parameter's post-accumulate-grad hook.
        self.weight_grad_hook = None
        self._attach()

    def _attach(self) -> None:
        # The optimizer reaches the layer through its weight (parameters are what it holds).
        self.weight.int8_linear = self
        self.weight.subspace_target = Int8Target(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> Int8Linear:
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    group_size, device=w.device, dtype=w.dtype)
        layer.store_weight_(w.float())
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        flat = dequantize_groupwise(self.weight, self.weight_scales, self.weight_zeros,
                                    self.weight.numel(), bits=8, group_size=self.group_size)
        return flat.view(self.out_features, self.in_features).to(dtype)

    @torch.no_grad()
    def store_weight_(self, w: Tensor, seed: int | None = None, offset: int = 0) -> None:
        """Quantise ``w`` into the stored codes: nearest rounding, or, with a ``seed`` (the
        optimizer's path), stochastic rounding with the counter-based draw of (``seed``,
        ``offset``) (``ops.int8_sr_store_``)."""
        if seed is None:
            codes, scales, zeros = quantize_groupwise(w, bits=8, group_size=self.group_size)
            self.weight.copy_(codes.view_as(self.weight))
            self.weight_scales.copy_(scales)
            self.weight_zeros.copy_(zeros)
            return
        ops.int8_sr_store_(self.weight, self.weight_scales, self.weight_zeros, w, seed, offset,
                           self.group_size)

    def __setstate__(self, state: dict) -> None:
        # deepcopy and unpickling rebuild the weight Parameter without its attributes.
        super().__setstate__(state)
        self._attach()

    def forward(self, x: Tensor) -> Tensor:
        anchor = x.new_empty(0).requires_grad_() if torch.is_grad_enabled() else None
        return _Int8LinearFunction.apply(x, self.bias, anchor, self)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantised weight (for export)."""
        bias = self.bias is not None
        linear = nn.Linear(self.in_features, self.out_features, bias=bias,
                           device=self.weight.device,
                           dtype=self.bias.dtype if bias else torch.float32)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight(linear.weight.dtype))
            if bias:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")


class Int8Target(Target):
    """The optimizer's view of an INT8 weight: its gradient is ``layer.weight_grad``, its
    update lands in a dequantised float copy, and that copy is stored back with stochastic
    rounding drawn from a per-parameter seed and the step (so a resumed run draws the same
    numbers)."""

    def __init__(self, layer: Int8Linear) -> None:
        self.layer = layer

    def grad(self, p: Tensor) -> Tensor | None:
        return self.layer.weight_grad

    def release_grad(self, p: Tensor) -> None:
        self.layer.weight_grad = None

    def weight(self, p: Tensor) -> Tensor:
        return self.layer.dequantized_weight()

    def init_state(self, p: Tensor, state: dict, param_index: int) -> None:
        state["sr_seed"] = torch.tensor(param_index, dtype=torch.int64)

    def commit(self, p: Tensor, weight: Tensor, state: dict, step: int) -> None:
        self.layer.store_weight_(weight, int(state["sr_seed"]), step)

    def register_grad_hook(self, p: Tensor, hook):
        self.layer.weight_grad_hook = hook
        return _HookHandle(self.layer)

    def zero_grad(self, p: Tensor) -> None:
        self.layer.weight_grad = None


class _HookHandle:
    def __init__(self, layer: Int8Linear) -> None:
        self.layer = layer

    def remove(self) -> None:
        self.layer.weight_grad_hook = None


def int8_layer_of(p: Tensor) -> Int8Linear | None:
    """The :class:`Int8Linear` whose weight ``p`` is, or ``None``."""
    return getattr(p, "int8_linear", None)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(pattern, name) for pattern in patterns)


def quantize_linear_layers(model: nn.Module, target_modules: Iterable[str],
                           group_size: int = 256) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name matches one of ``target_modules``
    (regular expressions, searched anywhere in the name, e.g. ``["attn", "mlp"]``) by an
    :class:`Int8Linear`. Returns the names replaced; raises ``ValueError`` if none matched."""
    patterns = list(target_modules)
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and _matches(name, patterns)]
    if not names:
        raise ValueError(f"No nn.Linear module matches target_modules={patterns!r}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child), group_size))
    return names


def dequantize_linear_layers(model: nn.Module) -> list[str]:
    """Turn every :class:`Int8Linear` back into an ``nn.Linear``; returns the names."""
    names = [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).to_linear())
    return names
