"""The projector's life cycle for one parameter: first touch, refresh when due (with the
moments kept, carried into the new subspace or reset, as the projector says), the basis
of this step and the projected gradient.

Refreshes run outside ``torch.compile``'s graph (an SVD with its fp64 fallback decides on
the host, by design); a steady step calls only ``basis`` and ``project``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..projectors.base import REPROJECT, RESET, Projector, Side
from . import moments

# Projector state computed for this step by another rank (``distributed.refresh``: one owner
# per matrix), by ``id`` of the parameter's state dict; :func:`refresh` installs it instead
# of computing.
computed: dict[int, dict[str, Any]] = {}


@torch.compiler.disable
def refresh(projector: Projector, state: dict, group: dict, g: Tensor, side: Side,
            moment_specs: dict[str, tuple[tuple[int, ...], bool]],
            reprojectable: frozenset[str],
            on_refresh: Callable[[float], None] | None = None) -> tuple[Any, Tensor]:
    """Compute a new subspace from ``g`` and move the stored moments as the projector's
    moment policy says; returns ``(basis, projected gradient)``. ``on_refresh`` is called
    with the refresh's wall time in seconds (on a GPU after synchronising, so the time is
    the work's)."""
    start = time.perf_counter()
    basis, low = _refresh(projector, state, group, g, side, moment_specs, reprojectable)
    if on_refresh is not None:
        if g.device.type == "cuda":
            torch.cuda.synchronize(g.device)
        on_refresh(time.perf_counter() - start)
    return basis, low


def _refresh(projector: Projector, state: dict, group: dict, g: Tensor, side: Side,
             moment_specs: dict[str, tuple[tuple[int, ...], bool]],
             reprojectable: frozenset[str]) -> tuple[Any, Tensor]:
    policy = projector.moment_policy(group)
    stored = [name for name in moment_specs if name in state]
    old_basis = None
    if policy == REPROJECT and stored:
        old_basis = projector.basis(state, group, g, side)
    given = computed.pop(id(state), None)
    if given is not None:
        # Every rank, the owner too, then projects alike (a refresh's by-product projection
        # may round differently from project()).
        state.update(given)
        low = None
    else:
        low = projector.refresh(state, group, g, side)
    basis = projector.basis(state, group, g, side)
    if low is None:
        low = projector.project(basis, g, side)
    if stored and policy in (RESET, REPROJECT):
        transition_moments(projector, state, group, stored, policy, old_basis, basis, side,
                           moment_specs, reprojectable)
    return basis, low


def transition_moments(projector: Projector, state: dict, group: dict, names: list[str],
                       policy: str, old_basis: Any, basis: Any, side: Side,
                       moment_specs: dict[str, tuple[tuple[int, ...], bool]],
                       reprojectable: frozenset[str]) -> None:
    """Reset the moments, or carry those that live in the subspace into the new one
    (second moments in absolute value, so they stay valid scales). Moments that are not
    subspace coordinates (Adafactor's factored statistics) are kept under REPROJECT."""
    bits = group.get("state_bits")
    for name in names:
        _, signed = moment_specs[name]
        if policy == RESET:
            value = torch.zeros_like(moments.load_moment(state, name, bits, signed))
        elif name in reprojectable:
            value = _reproject_scale_safe(
                projector, old_basis, basis, moments.load_moment(state, name, bits, signed),
                side)
            if not signed:
                value = value.abs()
        else:
            continue
        moments.store_moment(state, name, value, bits, signed,
                             group.get("min_8bit_size", moments.MIN_8BIT_SIZE))


def _reproject_scale_safe(projector: Projector, old_basis: Any, basis: Any, moment: Tensor,
                          side: Side) -> Tensor:
    """``projector.reproject`` of ``moment`` divided by a power of two near its largest
    element, multiplied back after: the same numbers (a power of two scales exactly), but
    no sum inside the two products overflows. A second moment of a gradient of 1e25 is
    already inf in float32 (its square); it is read as the largest float, so the move gives
    +-inf (a zero step, as AdamW takes with an inf second moment), not inf - inf = NaN."""
    if not moment.is_floating_point() or moment.numel() == 0:
        return projector.reproject(old_basis, basis, moment, side)
    big = torch.finfo(moment.dtype).max
    finite = torch.nan_to_num(moment, posinf=big, neginf=-big)
    peak = finite.abs().amax()
    _, exponent = torch.frexp(peak)
    factor = torch.ldexp(torch.ones((), dtype=moment.dtype, device=moment.device), -exponent)
    factor = torch.where(peak > 0, factor, torch.ones_like(factor))
    return projector.reproject(old_basis, basis, finite * factor, side) / factor


def project(projector: Projector, state: dict, group: dict, g: Tensor, side: Side,
            due: bool, moment_specs: dict, reprojectable: frozenset[str],
            on_refresh: Callable[[float], None] | None = None) -> tuple[Any, Tensor]:
    """``(basis, projected gradient)`` of this step, refreshing first when ``due``."""
    if due:
        return refresh(projector, state, group, g, side, moment_specs, reprojectable,
                       on_refresh)
    basis = projector.basis(state, group, g, side)
    return basis, projector.project(basis, g, side)
