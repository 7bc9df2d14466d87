"""``subspace_adafactor``: Adafactor in the subspace, reference and foreach bodies.

Two orders of the same pieces (``subspace_optim.rules.adafactor``):

* transformers' and galore-torch's (default): precondition by the factored second
  moment, clip by RMS, scale by ``lr_t``, then average into the momentum;
* Flora's (``flora_momentum=True``): average the preconditioned gradient into the
  momentum first, then clip and scale. The momentum may live in a random subspace of its
  own (``momentum_bases``: per parameter ``(basis, new basis or None)`` of the ``flora``
  projector, or ``None``): ``update = (1 - b1) u + b1 up(M)``, at a resample ``M`` moves to
  the new basis, then ``M <- b1 M + (1 - b1) down(u)``. The gradient and the second moment
  stay full-size; only the momentum is compressed.

``lr_t = rho_t * max(eps[1], RMS(W))`` with ``scale_parameter`` (``rho_t`` the relative step
or ``lr``); the weight takes ``W <- (1 - wd lr_t) W - scale * back(update)``. Adafactor's
statistics need per-tensor reductions, so the foreach body differs from the reference only
in folding the decay into the back-projection; there is no fused kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..projectors.base import Projector, Side
from ..rules import adafactor as af
from ._apply import apply_folded, apply_reference


def step_size(param: Tensor, step: int, *, lr: float | None, relative_step: bool,
              warmup_init: bool, scale_parameter: bool, eps2: float) -> float | Tensor:
    rho = af.relative_step_size(lr, step, relative_step, warmup_init)
    if scale_parameter:
        return af.rms(param.float()).clamp(min=eps2) * rho
    return rho


def _preconditioned(g: Tensor, moments: dict[str, Tensor], beta2: float, eps: float) -> Tensor:
    if "exp_avg_sq_row" in moments:
        return af.factored_preconditioned(g, moments["exp_avg_sq_row"],
                                          moments["exp_avg_sq_col"], beta2, eps)
    return af.full_preconditioned(g, moments["exp_avg_sq"], beta2, eps)


def flora_update(g: Tensor, moments: dict[str, Tensor], step: int, *, lr: float | Tensor,
                 beta1: float | None, decay_rate: float, eps: float, clip_threshold: float,
                 momentum_projector: Projector | None, bases: Any, side: Side | None) -> Tensor:
    """Flora's order (module docstring); updates ``moments`` (``exp_avg`` may be replaced by
    a new tensor) and returns the lr-scaled update."""
    update = _preconditioned(g, moments, af.decay_beta2(step, decay_rate), eps)
    if beta1 and bases is None:
        update = update * (1 - beta1) + moments["exp_avg"] * beta1
        moments["exp_avg"].copy_(update)
    elif beta1:
        basis, new_basis = bases
        raw = update
        momentum = momentum_projector.project_back(basis, moments["exp_avg"], side)
        update = raw * (1 - beta1) + momentum * beta1
        if new_basis is not None:
            moments["exp_avg"] = momentum_projector.reproject(basis, new_basis,
                                                              moments["exp_avg"], side)
            basis = new_basis
        moments["exp_avg"] = moments["exp_avg"] * beta1 + momentum_projector.project(
            basis, raw, side) * (1 - beta1)
    af.clip_by_rms_(update, clip_threshold)
    return update * lr


def subspace_adafactor(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    bases: Sequence[Any],
    moments: Sequence[dict[str, Tensor]],
    state_steps: Sequence[int],
    *,
    projector: Projector | None = None,
    sides: Sequence[Side | None] | None = None,
    lr: float | None,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    scale: float = 1.0,
    maximize: bool = False,
    flora_momentum: bool = False,
    momentum_projector: Projector | None = None,
    momentum_bases: Sequence[Any] | None = None,
    momentum_sides: Sequence[Side | None] | None = None,
    impl: str = "foreach",
) -> None:
    """One Adafactor step for every parameter of a bucket; ``moments[i]`` maps names to the
    parameter's moments (``exp_avg``, ``exp_avg_sq_row``/``exp_avg_sq_col`` or
    ``exp_avg_sq``) and is updated in place (see the module docstring)."""
    if impl not in ("reference", "foreach", "fused"):
        raise ValueError(f"Invalid impl: {impl!r} (expected reference, foreach or fused)")
    n = len(params)
    sides = sides if sides is not None else [None] * n
    momentum_bases = momentum_bases if momentum_bases is not None else [None] * n
    momentum_sides = momentum_sides if momentum_sides is not None else [None] * n
    for i, (w, g, basis, moms, step, side) in enumerate(zip(params, grads, bases, moments,
                                                            state_steps, sides, strict=True)):
        if maximize:
            g = -g
        lr_t = step_size(w, step, lr=lr, relative_step=relative_step, warmup_init=warmup_init,
                         scale_parameter=scale_parameter, eps2=eps[1])
        if flora_momentum:
            update = flora_update(g, moms, step, lr=lr_t, beta1=beta1, decay_rate=decay_rate,
                                  eps=eps[0], clip_threshold=clip_threshold,
                                  momentum_projector=momentum_projector,
                                  bases=momentum_bases[i], side=momentum_sides[i])
        else:
            update = af.adafactor_update(g, moms, step, lr=lr_t, beta1=beta1,
                                         decay_rate=decay_rate, eps=eps[0],
                                         clip_threshold=clip_threshold)
        if impl == "reference":
            apply_reference(w, update, basis, projector, side, scale, 1.0, weight_decay * lr_t,
                            decay_after=False)
        else:
            decay = weight_decay * lr_t if weight_decay else 0.0
            apply_folded([w], [update], [basis], projector, [side], [-scale], decay,
                         decay_after=False)
