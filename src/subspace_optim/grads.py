"""Gradient norms, clipping and loss scaling that see every gradient the optimizers use,
including those kept outside ``.grad``: an INT8 weight (``subspace_optim.nn.Int8Linear``)
keeps its float gradient in ``layer.weight_grad``, because an integer tensor cannot hold a
float ``.grad``. ``torch.nn.utils.clip_grad_norm_`` and ``torch.amp.GradScaler`` read
``.grad`` only, so with INT8 weights they would clip, log and unscale every gradient but
those.

* :func:`clip_grad_norm_` and :func:`grad_norm`: drop-in versions of torch's that take an
  optimizer (its parameters) or any parameters, INT8 weights' gradients included.
* :func:`unscale_`: ``scaler.unscale_(optimizer)`` for the INT8 weights' gradients too
  (unscaled by the same factor, their infs and NaNs counted, so that ``scaler.step`` skips
  the step and ``scaler.update`` backs off as for any other gradient). An optimizer of this
  library that holds INT8 weights refuses a ``scaler.step`` without it, rather than step on
  gradients 65536 times too large.

A loop with INT8 weights and fp16 loss scaling::

    scaler.scale(loss).backward()
    subspace_optim.unscale_(scaler, optimizer)
    subspace_optim.clip_grad_norm_(optimizer, 1.0)
    scaler.step(optimizer)
    scaler.update()
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from .optim import targets
from .optim.targets import target_of


def _parameters(params: torch.optim.Optimizer | Iterable[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(params, torch.optim.Optimizer):
        return [p for group in params.param_groups for p in group["params"]]
    if isinstance(params, Tensor):
        return [params]
    return list(params)


def _warn_if_layerwise(params) -> None:
    if getattr(params, "_backward_stepper", None) is not None:
        warnings.warn(
            "layer-wise mode (step_in_backward): every gradient was consumed and freed inside "
            "backward, so a norm or clip taken after it sees none (0.0) and clips nothing; "
            "pass max_grad_norm to step_in_backward and read handle.grad_norm",
            UserWarning, stacklevel=3)


def gradients(params: torch.optim.Optimizer | Iterable[Tensor] | Tensor) -> list[Tensor]:
    """The gradient of each parameter that has one: ``.grad``, or where a layer keeps it
    (an INT8 weight's ``weight_grad``)."""
    _warn_if_layerwise(params)
    out = []
    for p in _parameters(params):
        grad = target_of(p).grad(p)
        if grad is not None:
            out.append(grad)
    return out


def grad_norm(params: torch.optim.Optimizer | Iterable[Tensor] | Tensor,
              norm_type: float = 2.0) -> Tensor:
    """The total norm of all gradients (as ``torch.nn.utils.get_total_norm``)."""
    grads = gradients(params)
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads, norm_type)


@torch.no_grad()
def clip_grad_norm_(params: torch.optim.Optimizer | Iterable[Tensor] | Tensor,
                    max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over every gradient, INT8 weights' included:
    scales them in place by ``min(1, max_norm / (total_norm + 1e-6))`` and returns the total
    norm before clipping."""
    grads = gradients(params)
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite)
    # torch's arithmetic: the fp32 factor multiplies each gradient in its dtype.
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    by_device: dict[torch.device, list[Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    for device, tensors in by_device.items():
        torch._foreach_mul_(tensors, factor.to(device))
    return total


def held_outside_grad(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients of ``optimizer``'s parameters that live outside ``.grad``."""
    return targets.held_outside_grad(_parameters(optimizer))


@torch.no_grad()
def unscale_(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)``, and the same for the gradients kept outside ``.grad``
    (see the module docstring). Call it where you would call ``scaler.unscale_``: after
    backward, before clipping and ``scaler.step``."""
    scaler.unscale_(optimizer)
    if not scaler.is_enabled():
        return
    extra = held_outside_grad(optimizer)
    # GradScaler keeps its scale and its per-optimizer record of infs privately; they are
    # what unscale_ itself uses (torch 2.4 to 2.13), read here so that these gradients are
    # unscaled by the same factor and their infs reach scaler.step and scaler.update.
    found_per_device = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
    inv_scale = scaler._scale.double().reciprocal().float()
    by_device: dict[torch.device, list[Tensor]] = {}
    for grad in extra:
        by_device.setdefault(grad.device, []).append(grad)
    for device, grads in by_device.items():
        found = torch.zeros((), dtype=torch.float32, device=device)
        for dtype in {g.dtype for g in grads}:
            torch._amp_foreach_non_finite_check_and_unscale_(
                [g for g in grads if g.dtype == dtype], found, inv_scale.to(device))
        if device in found_per_device:
            found_per_device[device] = found_per_device[device] + found
        else:
            found_per_device[device] = found
    optimizer._outside_grads_unscaled = True
