"""Plumbing shared by every optimizer of the library: validation, routing of each parameter
to a projected or full-rank update, the projector's life cycle, and checkpoint loading.

Subclasses supply the inner rule through four hooks: ``_validate_rule_group``,
``moment_names`` / ``nonnegative_moments`` and ``_rule_update``. They hold no math.

Param groups follow galore-torch's contract: a group with the key ``rank`` is projected
(its matrices; 1-D parameters in it get the full-rank update), a group without it is
updated at full rank. Group values stay plain Python values so ``state_dict()`` loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._validate import check_bool, check_choice, check_lr, check_number, is_int, scalar_value
from ..nn.int8_linear import int8_layer_of
from ..projectors.base import (
    REPROJECT,
    RESET,
    Projector,
    get_projector,
    matrix_shape,
    resolve_side,
)
from . import checkpoint, moments
from .groups import check_group_keys


class RuleStep(NamedTuple):
    """What an inner rule returns for one parameter.

    direction: in the gradient's (possibly projected) space;
    step_size: the update is ``-step_size * direction`` (times the projection's scale);
    decay: decoupled weight decay, ``p <- p - decay * p``;
    decay_after: apply it after the update (galore-torch) instead of before (torch).
    """

    direction: Tensor
    step_size: float | Tensor
    decay: float | Tensor
    decay_after: bool = False


def host_hyperparameters(group: dict) -> dict:
    """The group with tensor hyperparameters (torch accepts a one-element tensor ``lr`` and
    tensor ``betas``) read as Python numbers, as torch's non-capturable paths do; the group
    itself when it holds none."""
    betas = group.get("betas")
    tensor_betas = isinstance(betas, (tuple, list)) and any(isinstance(b, Tensor) for b in betas)
    if not isinstance(group["lr"], Tensor) and not tensor_betas:
        return group
    out = dict(group)
    out["lr"] = scalar_value(group["lr"], "lr")
    if tensor_betas:
        out["betas"] = tuple(scalar_value(b, "betas") for b in betas)
    return out


def _nonzero(value: float | Tensor) -> bool:
    return isinstance(value, Tensor) or value != 0


def _int8_grad(p: Tensor) -> Tensor | None:
    layer = int8_layer_of(p)
    return None if layer is None else layer.weight_grad


class _Projected(NamedTuple):
    """A projected parameter's step in progress: the projector, the gradient as a matrix,
    the side, the current basis (None: not built yet), the projected gradient, and whether
    this step (or window) began with a refresh."""

    projector: Projector
    g: Tensor
    side: str
    basis: Any
    low: Tensor | None
    refreshed: bool


class SubspaceOptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose projected groups update in a subspace."""

    # The rule's moments that are coordinates in the subspace and so move with it when a
    # projector re-projects at a refresh (set by each rule's subclass).
    reprojectable_moments: frozenset[str] = frozenset()
    # Whether a rank larger than a matrix's smaller dimension is an error (it is, unless a
    # method decides per parameter whether to project, as Flora's Adafactor does).
    rank_must_fit: bool = True

    # Name of the inner rule; a state dict saved by one rule cannot be continued by another.
    rule_name: str = ""
    # Projector of groups that set ``rank`` but no ``projector``; named subclasses change it.
    default_projector: str = "galore"

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, projector: str) -> None:
        # Read by add_param_group, which Optimizer.__init__ calls for every group.
        self._default_projector = projector
        # Set by subspace_optim.step_in_backward while parameters step inside backward.
        self._backward_stepper = None
        # Global-clipping reference of layer-wise mode, loaded before a stepper exists.
        self._pending_clip_norm = None
        self._nonfinite_skips = 0
        defaults.setdefault("skip_nonfinite", False)
        # Hyperparameters are checked before the parameters, as torch's optimizers do, so
        # that a bad lr is reported as such whatever the params argument.
        self._validate_common(dict(defaults))
        self._validate_rule_group(dict(defaults))
        super().__init__(params, defaults)
        if not any("rank" in group for group in self.param_groups):
            warnings.warn(
                f"{type(self).__name__}: no param group has 'rank', so nothing is projected and "
                "every parameter gets the full-rank update (the memory of the plain optimizer). "
                "Put the matrices to project in a group with 'rank', e.g. "
                "[{'params': others}, {'params': matrices, 'rank': 128}].",
                UserWarning,
                stacklevel=3,
            )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_default_projector"] = self._default_projector
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by load_state_dict (with state and groups only): attributes that
        # already exist are kept; an unpickled or deep-copied optimizer gets fresh ones (its
        # copy is not attached to the original's backward hooks).
        super().__setstate__(state)
        self.__dict__.setdefault("_default_projector", type(self).default_projector)
        self.__dict__.setdefault("_backward_stepper", None)
        self.__dict__.setdefault("_pending_clip_norm", None)
        self.__dict__.setdefault("_nonfinite_skips", 0)
        self.defaults.setdefault("skip_nonfinite", False)
        for group in self.param_groups:
            group.setdefault("skip_nonfinite", False)
            group.setdefault("state_bits", None)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = set(param_group) if isinstance(param_group, dict) else {"params"}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.check_group(group, given)
        except ValueError:
            self.param_groups.pop()
            raise

    def check_group(self, group: dict, given: set[str] | None = None) -> None:
        """Validate ``group`` (defaults already filled in) and fill in its projector's
        defaults; raise ``ValueError`` naming the first bad key or value. ``given``: the
        keys the user wrote, for the warning about projection keys without ``rank``."""
        check_group_keys(group, self.defaults, type(self).__name__, given)
        self._validate_common(group)
        self._validate_rule_group(group)
        if "rank" in group:
            self._prepare_projected_group(group)

    def _validate_common(self, group: dict) -> None:
        self._validate_lr(group)
        group.setdefault("state_bits", None)
        group.setdefault("skip_nonfinite", False)
        check_choice(group, "state_bits", moments.STATE_BITS)
        check_bool(group, "skip_nonfinite")
        check_number(group, "weight_decay", 0.0, label="weight_decay value")

    def _validate_lr(self, group: dict) -> None:
        check_lr(group)

    def _validate_rule_group(self, group: dict) -> None:
        raise NotImplementedError

    def _prepare_projected_group(self, group: dict) -> None:
        group.setdefault("projector", self._default_projector)
        projector = get_projector(group["projector"])
        for key, value in projector.group_defaults.items():
            group.setdefault(key, value)
        rank = group["rank"]
        if not is_int(rank) or rank < 1:
            raise ValueError(f"Invalid rank: {rank!r} (must be an integer >= 1)")
        projector.validate_group(group)
        for p in group["params"]:
            if p.dim() < 2 or not self.rank_must_fit:
                continue
            m, n = matrix_shape(p.shape)
            if rank > min(m, n):
                raise ValueError(
                    f"Invalid rank: {rank} is larger than the smaller dimension of a parameter "
                    f"of shape {tuple(p.shape)} (projected as a {m}x{n} matrix); use rank <= "
                    f"{min(m, n)} or move this parameter to a group without 'rank'"
                )

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._backward_stepper is not None:
            # Parameters were updated inside backward; this call only closes the step.
            self._backward_stepper.close_step()
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad if p.grad is not None else _int8_grad(p)
                if grad is not None:
                    self._step_param(p, grad, group)
                elif "window_grad" in self.state.get(p, {}):  # Grass's sparse weight gradient
                    window, refreshed = self._take_window(p)
                    self._step_param(p, None, group, window=window, refreshed=refreshed)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                layer = int8_layer_of(p)
                if layer is not None:
                    layer.weight_grad = None

    def projects(self, p: Tensor, group: dict) -> bool:
        """Whether ``p`` is updated in a subspace (its group has ``rank`` and it is a matrix)."""
        return "rank" in group and p.dim() >= 2

    @property
    def nonfinite_skips(self) -> int:
        """How many parameter updates ``skip_nonfinite`` has skipped since construction
        (a diagnostic for logs; not part of the state dict)."""
        return self._nonfinite_skips

    def _skips_nonfinite(self, group: dict, grad: Tensor) -> bool:
        """Whether to skip this update: ``skip_nonfinite`` is on and ``grad`` has a NaN or an
        inf. (A host sync, the price of the option.)"""
        if group["skip_nonfinite"] and not bool(torch.isfinite(grad).all()):
            self._nonfinite_skips += 1
            return True
        return False

    def _step_param(
        self, p: Tensor, grad: Tensor | None, group: dict, *, window: Tensor | None = None,
        refreshed: bool = False,
    ) -> None:
        """Update one parameter from ``grad``; the unit that per-layer stepping calls.

        ``window``: for a projected parameter, the projected gradient accumulated over a
        gradient-accumulation window (see :meth:`_accumulate_projected`); ``grad`` is then
        the window's last micro-batch, used only by projectors that learn from it, and
        ``refreshed`` says whether the window began with a refresh. ``grad`` may be ``None``
        when only the projected gradient was ever formed (Grass's sparse compute path).
        """
        if grad is not None:
            self._check_grad(p, grad)
        if self._skips_nonfinite(group, grad if window is None else window):
            return
        group = host_hyperparameters(group)
        state = self.state[p]
        step = state.get("step", 0)
        layer = int8_layer_of(p)
        # The float tensor the update is applied to: the parameter itself, or the
        # dequantised weight of an INT8 layer (stored back with stochastic rounding).
        target = p if layer is None else layer.dequantized_weight()
        if self.projects(p, group):
            if window is None:
                parts = self._projected_gradient(p, grad, group, state, step, start=True)
            else:
                parts = self._subspace(p, grad, group, state)._replace(
                    low=window, refreshed=refreshed
                )
            self._finish_projected(target, parts, group, state, step)
        else:
            rule = self._rule(grad, state, group, step, target)
            self._apply(target, rule, 1.0, lambda alpha: target.add_(rule.direction, alpha=alpha))
        if layer is not None:
            layer.store_weight_(target, self._rounding_generator(p, state, step))
        state["step"] = step + 1

    def _subspace(self, p: Tensor, grad: Tensor | None, group: dict, state: dict) -> _Projected:
        """The projector, gradient matrix and side of a projected parameter (no basis yet)."""
        projector = get_projector(group["projector"])
        # Without a full gradient (Grass's sparse path) the weight stands in for its shape.
        g = (grad if grad is not None else p.detach()).reshape(matrix_shape(p.shape))
        side = resolve_side(g.shape, group["proj_type"])
        if "step" not in state:
            projector.init_state(state, self._param_index(p), group)
            state["step"] = 0
        return _Projected(projector, g, side, None, None, False)

    def _projected_gradient(
        self, p: Tensor, grad: Tensor, group: dict, state: dict, step: int, start: bool
    ) -> _Projected:
        """Project ``grad``; at the ``start`` of a step (or window) refresh first if due."""
        projector, g, side, _, _, _ = self._subspace(p, grad, group, state)
        refreshed = start and projector.needs_refresh(state, step, group)
        basis, low = self._project(projector, state, g, side, group, refreshed)
        return _Projected(projector, g, side, basis, low, refreshed)

    def _accumulate_projected(self, p: Tensor, grad: Tensor, group: dict, start: bool) -> None:
        """Add ``grad``, projected, to the window's accumulator ``state["window_grad"]``
        (r x n or m x r). The window's subspace is fixed by its first micro-batch
        (``start``), where a due refresh happens; the full gradient is not kept."""
        state = self.state[p]
        if start:
            state.pop("window_skip", None)
        if state.get("window_skip") or self._skips_nonfinite(group, grad):
            # A non-finite micro-batch spoils its whole window: nothing is projected or
            # refreshed from it and the window's step is skipped (see take_window).
            state.pop("window_grad", None)
            state["window_skip"] = True
            return
        parts = self._projected_gradient(p, grad, group, state, state.get("step", 0), start)
        if start:
            state["window_grad"] = parts.low  # a new tensor: projections never alias grad
            state["window_refreshed"] = parts.refreshed
        else:
            state["window_grad"].add_(parts.low)

    def _take_window(self, p: Tensor) -> tuple[Tensor, bool] | None:
        """Remove the finished window of ``p`` from its state: ``(projected gradient,
        refreshed)``, or ``None`` when a non-finite micro-batch spoiled it."""
        state = self.state[p]
        if state.pop("window_skip", False):
            state.pop("window_grad", None)
            state.pop("window_refreshed", None)
            return None
        return state.pop("window_grad"), state.pop("window_refreshed")

    def _add_projected_gradient(self, p: Tensor, low: Tensor) -> None:
        """Deposit a gradient that arrives already projected (Grass's sparse compute path)
        into the window accumulator, where ``step`` (or the backward stepper) takes it."""
        state = self.state[p]
        if "window_grad" in state:
            state["window_grad"].add_(low)
        else:
            state["window_grad"] = low
            state["window_refreshed"] = False

    def _finish_projected(self, target: Tensor, parts: _Projected, group: dict, state: dict,
                          step: int) -> None:
        projector, g, side, basis, low, refreshed = parts
        if basis is None:
            basis = projector.basis(state, side, g, group)
        matrix = (target if target.is_contiguous() else target.contiguous()).view(g.shape)
        rule = self._rule(low, state, group, step, matrix)

        def add_back(alpha: float) -> None:
            projector.add_back_(basis, rule.direction, side, matrix, alpha)

        self._apply(matrix, rule, group["scale"], add_back)
        if matrix.data_ptr() != target.data_ptr():
            target.copy_(matrix.view_as(target))
        projector.after_update(state, g, side, basis, group, refreshed)

    def _rounding_generator(self, p: Tensor, state: dict, step: int) -> torch.Generator:
        """A generator for this step's stochastic rounding, derived from a per-parameter seed
        and the step, so that a resumed run draws exactly what the uninterrupted one did."""
        if "sr_seed" not in state:
            state["sr_seed"] = torch.tensor(self._param_index(p), dtype=torch.int64)
        seed = (int(state["sr_seed"]) * 1_000_003 + step) % (2**63 - 1)
        return torch.Generator(device=p.device).manual_seed(seed)

    def _check_grad(self, p: Tensor, grad: Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients "
                f"(parameter of shape {tuple(p.shape)})"
            )
        if torch.is_complex(grad) or torch.is_complex(p):
            raise RuntimeError(
                f"{type(self).__name__} does not support complex parameters or gradients "
                f"(parameter of shape {tuple(p.shape)}, dtype {p.dtype}); "
                "optimize torch.view_as_real(p) instead"
            )

    def _param_index(self, p: Tensor) -> int:
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        return next(i for i, q in enumerate(params, start=1) if q is p)

    def _project(
        self, projector: Projector, state: dict, g: Tensor, side: str, group: dict,
        refresh: bool,
    ) -> tuple[Any, Tensor]:
        if not refresh:
            basis = projector.basis(state, side, g, group)
            return basis, projector.project(basis, g, side)
        policy = projector.moment_policy(group)
        stored = [name for name in self._moment_specs(g, group) if name in state]
        old_basis = None
        if policy == REPROJECT and stored:
            old_basis = projector.basis(state, side, g, group)
        low = projector.refresh(state, g, side, group)
        basis = projector.basis(state, side, g, group)
        if low is None:
            low = projector.project(basis, g, side)
        if stored and policy in (RESET, REPROJECT):
            self._transition_moments(projector, state, group, stored, policy, old_basis, basis,
                                     side, low)
        return basis, low

    def _transition_moments(
        self, projector: Projector, state: dict, group: dict, names: list[str], policy: str,
        old_basis: Any, basis: Any, side: str, low: Tensor,
    ) -> None:
        """Reset the moments, or carry those that live in the subspace into the new one
        (second moments in absolute value, so they stay valid scales). Moments that are not
        subspace coordinates (Adafactor's factored statistics) are kept under REPROJECT."""
        bits = group.get("state_bits")
        specs = self._moment_specs(low, group)
        for name in names:
            _, signed = specs[name]
            if policy == RESET:
                value = torch.zeros_like(moments.load_moment(state, name, bits, signed))
            elif name in self.reprojectable_moments:
                value = projector.reproject(
                    old_basis, basis, moments.load_moment(state, name, bits, signed), side
                )
                if not signed:
                    value = value.abs()
            else:
                continue
            moments.store_moment(state, name, value, bits, signed)

    def _rule(
        self, grad: Tensor, state: dict, group: dict, step: int, target: Tensor
    ) -> RuleStep:
        bits = group.get("state_bits")
        specs = self._moment_specs(grad, group)
        if any(name not in state for name in specs):
            for name, (shape, signed) in specs.items():
                moments.init_moment(state, name, shape, grad, bits, signed)
        compute = {name: moments.load_moment(state, name, bits, signed)
                   for name, (_, signed) in specs.items()}
        dtype = moments.compute_dtype(bits, grad)
        rule = self._rule_update(grad.to(dtype), compute, group, step + 1, target)
        for name, (_, signed) in specs.items():
            moments.store_moment(state, name, compute[name], bits, signed)
        return rule

    def _moment_specs(self, grad: Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], bool]]:
        """The rule's moments for a gradient of this shape: name -> (shape, signed)."""
        raise NotImplementedError

    def _rule_update(
        self, grad: Tensor, moments: dict[str, Tensor], group: dict, step: int, param: Tensor
    ) -> RuleStep:
        """Update ``moments`` in place from ``grad`` (``step`` is 1-based); ``param`` is the
        float weight (read only, e.g. for Adafactor's RMS)."""
        raise NotImplementedError

    @staticmethod
    def _apply(
        target: Tensor, rule: RuleStep, scale: float, add_update: Callable[[float], None]
    ) -> None:
        """Decoupled weight decay ``target -= decay * target`` around the update
        ``target += -scale * step_size * direction``, before it (torch's order) or after
        it (galore-torch's)."""
        if not rule.decay_after and _nonzero(rule.decay):
            target.mul_(1 - rule.decay)
        add_update(-scale * rule.step_size)
        if rule.decay_after and _nonzero(rule.decay):
            target.add_(target, alpha=-rule.decay)

    # ------------------------------------------------------------------ checkpoints
    # Group keys a state dict of an older release may lack (filled in by __setstate__).
    optional_group_keys: frozenset[str] = frozenset({"state_bits", "skip_nonfinite"})

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus an entry saying which optimizer wrote it and, in
        layer-wise mode, the global-clipping reference (the last step's total norm)."""
        state_dict = super().state_dict()
        stepper = self._backward_stepper
        extra = checkpoint.marker(self)
        extra["clip_norm"] = stepper.clip_norm if stepper is not None else self._pending_clip_norm
        state_dict[checkpoint.EXTRA_KEY] = extra
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer.load_state_dict``, but check everything first
        (see ``optim.checkpoint``: a state dict that does not fit is refused with the reason
        and the optimizer stays as it was) and keep every state tensor's saved dtype.

        State tensors only move: to the parameter's device, or to the CPU for the keys a
        projector declares host-side.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = checkpoint.prepare_load(self, state_dict)
        clip_norm = (state_dict.get(checkpoint.EXTRA_KEY) or {}).get("clip_norm")
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": groups})
        self._pending_clip_norm = clip_norm
        if self._backward_stepper is not None:
            self._backward_stepper.clip_norm = clip_norm
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def host_state_keys(self, groups: list[dict] | None = None) -> frozenset[str]:
        """State keys kept on the CPU whatever the parameter's device (seeds, counters)."""
        names = {g["projector"] for g in (groups or self.param_groups) if "rank" in g}
        keys = frozenset({"sr_seed"})
        return keys.union(*(get_projector(n).host_state_keys for n in names))

    def expected_state_shapes(self, p: Tensor, group: dict) -> dict[str, tuple[int, ...]]:
        """The rule's moments this optimizer keeps for ``p`` in ``group``, with their shapes
        (computed on meta tensors), for checking a state dict before loading it."""
        if self.projects(p, group):
            m, n = matrix_shape(p.shape)
            side = resolve_side((m, n), group["proj_type"])
            r = group["rank"]
            shape = (m, r) if side == "right" else (r, n)
        else:
            shape = tuple(p.shape)
        low = torch.empty(shape, device="meta")
        return {name: spec[0] for name, spec in self._moment_specs(low, group).items()}
