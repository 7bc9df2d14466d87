"""APOLLO, APOLLO-Mini and Fira: AdamW's moments in a subspace, used to scale a full-rank
gradient rather than to step in the subspace.

APOLLO (Zhu et al., MLSys 2025, arXiv 2412.05270; reference ``apollo-torch`` 1.0.3): AdamW
runs on the projected gradient ``R`` (a seeded Gaussian projection, ``projectors.apollo``),
giving ``N = m / (sqrt(v) + eps)``; the update is the raw gradient ``G`` scaled channel by
channel by ``||N_c|| / (||R_c|| + 1e-8)`` (``scale_type="channel"``: a channel is a row of a
right-side, a column of a left-side projection, the norm taken over the rank) or by one
factor per tensor (``"tensor"``: APOLLO-Mini, rank 1, ``scale`` 128), times
``sqrt(scale)``. Fira (Chen et al., arXiv 2410.01623; reference ``fira`` 1.0.2) keeps
GaLore's update ``scale * back(N)`` (SVD basis) and adds the part of the gradient outside the
subspace, ``S = G - scale * back(R)`` (the reference subtracts the scaled projection),
scaled channel-wise by the same factor.

Both limit the growth of what they add (Fira's norm-growth limiter): when its norm grows
more than 1.01x over the previous step's, it is scaled back to 1.01x that (the previous norm
is one float32 scalar in the state, ``limiter_norm``). ``norm_limiter=False`` (APOLLO's
``disable_nl``) switches it off; ``scale_front=True`` (APOLLO's) applies ``sqrt(scale)``
before the limiter instead of after.

Everything else is AdamW with galore-torch's conventions, as both references: bias
correction as ``lr sqrt(1 - b2^t) / (1 - b1^t)``, eps outside the square root, decoupled
weight decay after the update. Parameters without ``rank`` take that AdamW update. The
update needs the full gradient of the step, so accumulation windows of layer-wise mode (which
keep only the projected sum) are refused; under FSDP2 the rule runs on gathered matrices, so
channel norms are those of the whole matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._validate import check_bool, check_choice
from ..projectors.base import Side
from ..rules.adamw import adamw_update
from . import engine
from .adamw import SubspaceAdamW

SCALE_TYPES = ("channel", "tensor")
GROWTH = 1.01  # Fira's norm-growth limit per step


def channel_factor(direction: Tensor, low: Tensor, side: Side | None, scale_type: str) -> Tensor:
    """``||N_c|| / (||R_c|| + 1e-8)`` per channel (norms over the rank dimension), shaped to
    broadcast over the full matrix, or one factor for the tensor."""
    if scale_type == "tensor":
        return torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(low) + 1e-8)
    dim = 1 if side == Side.RIGHT else 0  # right: R is m x r, left: r x n
    factor = (torch.linalg.vector_norm(direction, dim=dim)
              / (torch.linalg.vector_norm(low, dim=dim) + 1e-8))
    return factor.unsqueeze(1) if side == Side.RIGHT else factor.unsqueeze(0)


def limit_growth_(update: Tensor, state: dict) -> Tensor:
    """Fira's norm-growth limiter on ``update`` (in place), with the previous norm in
    ``state["limiter_norm"]`` (no host read: a 0-d tensor)."""
    norm = torch.linalg.vector_norm(update.float())
    previous = state.get("limiter_norm")
    if previous is None:
        state["limiter_norm"] = norm
        return update
    limiter = (norm / (previous + 1e-8)).clamp(min=GROWTH) / GROWTH
    update.div_(limiter.to(update.dtype))
    state["limiter_norm"] = norm / limiter
    return update


class _ScaledAdamW(SubspaceAdamW):
    """The shared plumbing: AdamW (galore conventions) on projected gradients, then the
    class's ``_update`` from the direction, the projected and the full gradient."""

    needs_full_gradient = True
    # No kernel of its own: fused=True runs the rule as written (as the reference does).
    has_fused = True
    shard_local_rule = False  # channel norms over the whole matrix (FSDP2 gathers it)
    optional_group_keys = SubspaceAdamW.optional_group_keys | {
        "scale_type", "norm_limiter", "scale_front"}

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, *, scale_type: str = "channel",
                 norm_limiter: bool = True, scale_front: bool = False, **kwargs: Any) -> None:
        self._rule_defaults = {"scale_type": scale_type, "norm_limiter": norm_limiter,
                               "scale_front": scale_front}
        kwargs.setdefault("convention", "galore")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return dict(self._rule_defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in (("scale_type", "channel"), ("norm_limiter", True),
                           ("scale_front", False)):
            for group in self.param_groups:
                group.setdefault(key, self.defaults.get(key, value))

    def _validate_rule_group(self, group: dict) -> None:
        super()._validate_rule_group(group)
        check_choice(group, "scale_type", SCALE_TYPES)
        check_bool(group, "norm_limiter")
        check_bool(group, "scale_front")

    def _run_rule(self, items: list[engine.Item], group: dict, impl: str) -> None:
        if not items[0].projected:
            super()._run_rule(items, group, "reference" if impl == "fused" else impl)
            return
        # A tensor lr stays a tensor inside torch.compile (see optim.hyperparameters).
        hp = self._hyperparameters(group, "foreach")
        for it in items:
            if it.grad is None or it.grad.shape != it.matrix.shape:
                raise RuntimeError(
                    f"{type(self).__name__} scales the full gradient of the step, which an "
                    "accumulation window or a layer that hands over only projected rows "
                    "(GrassLinear) does not keep; step with accumulation_steps=1")
            step = it.step + 1
            low = -it.low if hp["maximize"] else it.low
            grad = -it.grad if hp["maximize"] else it.grad
            direction, factor = adamw_update(
                low, it.moments["exp_avg"], it.moments["exp_avg_sq"], step,
                beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"],
                correct_bias=hp["correct_bias"], convention="galore")
            projector = engine.item_projector([it], group)
            update = self._update(it, group, projector, low, grad, direction)
            step_size = hp["lr"] * factor
            if isinstance(step_size, Tensor):
                it.matrix.sub_((update * step_size).to(it.matrix.dtype))
            else:
                it.matrix.add_(update.to(it.matrix.dtype), alpha=-step_size)
            if hp["weight_decay"]:
                it.matrix.mul_(1 - hp["lr"] * hp["weight_decay"])

    def _update(self, it: engine.Item, group: dict, projector: Any, low: Tensor,
                grad: Tensor, direction: Tensor) -> Tensor:
        raise NotImplementedError


class ApolloAdamW(_ScaledAdamW):
    """APOLLO (module docstring). Defaults of ``apollo_torch.APOLLOAdamW``: lr 1e-3, betas
    (0.9, 0.999), eps 1e-6, weight_decay 0; group keys ``rank``, ``update_proj_gap`` (200),
    ``scale`` (1), ``scale_type`` (``"channel"``), ``generator`` (``"counter"``, or
    ``"torch"`` for apollo-torch's own draws), ``proj_type``. Constructor flags
    ``norm_limiter`` (apollo-torch's ``not disable_nl``) and ``scale_front``."""

    default_projector = "apollo"

    def _update(self, it, group, projector, low, grad, direction):
        scaled = grad * channel_factor(direction, low, it.side, group["scale_type"])
        root = math.sqrt(group["scale"])
        if group["scale_front"]:
            scaled = scaled * root
        if group["norm_limiter"]:
            limit_growth_(scaled, it.state)
        if not group["scale_front"]:
            scaled = scaled * root
        return scaled

    @staticmethod
    def mini_groups(params: Iterable, **keys: Any) -> dict:
        """APOLLO-Mini's projected group for ``params``: rank 1, one scaling factor per
        tensor, ``scale`` 128 (the paper's), as ``ApolloAdamW([..., mini_groups(w)])``."""
        return {"params": list(params), "rank": 1, "scale_type": "tensor", "scale": 128.0,
                **keys}


class ApolloMiniAdamW(ApolloAdamW):
    """APOLLO-Mini: :class:`ApolloAdamW` whose projected groups default to rank 1, one
    scaling factor per tensor (``scale_type="tensor"``) and ``scale`` 128, the paper's and
    transformers' ``apollo_adamw`` mini settings. A group sets ``rank: 1`` (or another rank)
    to be projected, as for every class."""

    def __init__(self, params: Iterable, lr: float = 1e-3, *, scale_type: str = "tensor",
                 **kwargs: Any) -> None:
        super().__init__(params, lr=lr, scale_type=scale_type, **kwargs)

    def check_group(self, group: dict, given: set[str] | None = None) -> None:
        if "rank" in group and (given is None or "scale" not in given):
            group.setdefault("scale", 128.0)
        super().check_group(group, given)


class FiraAdamW(_ScaledAdamW):
    """Fira (module docstring). Defaults of ``fira.FiraAdamW``: lr 1e-3, betas
    (0.9, 0.999), eps 1e-6, weight_decay 0; GaLore's SVD projector and group keys
    (``rank``, ``update_proj_gap``, ``scale``, which the reference calls ``alpha``,
    ``proj_type``, and ``svd``), ``scale_type`` channel."""

    default_projector = "galore"

    def _update(self, it, group, projector, low, grad, direction):
        alpha = group["scale"]
        # project_back computes in the moments' precision (float32 for bf16 weights).
        inside = projector.project_back(it.basis, low, it.side) * alpha
        residual = (grad - inside) * channel_factor(direction, low, it.side,
                                                    group["scale_type"])
        if group["norm_limiter"]:
            limit_growth_(residual, it.state)
        return projector.project_back(it.basis, direction, it.side) * alpha + residual
