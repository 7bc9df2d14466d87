"""``SubspaceOptimizer``: the ``torch.optim.Optimizer`` every class of the library is.

Param groups follow galore-torch's contract: a group with the key ``rank`` is projected
(its matrices; 1-D parameters in it get the full-rank update), a group without it is
updated at full rank. Group values stay plain Python values so ``state_dict()`` loads with
``torch.load(weights_only=True)``.

The work is split by concern: ``groups`` checks keys and values, ``engine`` gathers a step
into buckets and dispatches them to the functional API, ``lifecycle`` runs the projector's
refreshes, ``moments`` keeps state precision, ``targets`` says where gradients come from and
updates land, ``accumulation`` keeps windows for updates inside backward, and
``checkpoint`` checks state dicts before they load. This class is the plumbing between
them; a subclass supplies its inner rule through ``_validate_rule_group``,
``_moment_specs`` and ``_run_rule``.

Implementations (torch's flags): ``foreach=None`` (default) or ``True`` runs the foreach
path, ``foreach=False`` the per-tensor reference, ``fused=True`` the op seam's kernels.
``maximize`` works; ``capturable`` and ``differentiable`` are refused: a subspace refresh is
decided on the host, and no update here is differentiable.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import ops
from .._validate import check_lr
from ..projectors.base import (
    get_projector,
    matrix_shape,
    projected_shape,
    registered_group_keys,
    registered_projectors,
    resolve_side,
)
from . import accumulation, checkpoint, engine, sharded
from .groups import check_group_keys, prepare_projected_group, validate_common
from .targets import PARAMETER, held_outside_grad, target_of

_ABSENT = "<absent>"
# Group keys that shape a parameter's state: changing one re-creates it. A projector adds
# its own (``Projector.state_layout_keys``: Q-GaLore's code width, group and queue size).
_STATE_LAYOUT_KEYS = frozenset({"rank", "projector", "proj_type", "state_bits"})
_WATCHED: dict[tuple[str, ...], tuple[str, ...]] = {}


def _watched_keys() -> tuple[str, ...]:
    """The group keys watched for changes: the projection's and the state precision (not
    lr or betas, which schedulers change every step), for the projectors registered now."""
    projectors = registered_projectors()
    keys = _WATCHED.get(projectors)
    if keys is None:
        keys = _WATCHED[projectors] = tuple(sorted(registered_group_keys()
                                                   | _STATE_LAYOUT_KEYS))
    return keys


def _state_layout_keys(group: dict) -> frozenset[str]:
    name = group.get("projector")
    if name in registered_projectors():
        return _STATE_LAYOUT_KEYS | get_projector(name).state_layout_keys
    return _STATE_LAYOUT_KEYS


def _shown(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)


class SubspaceOptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose projected groups update in a subspace."""

    # Name of the inner rule; a state dict saved by one rule cannot be continued by another.
    rule_name: str = ""
    # Projector of groups that set ``rank`` but no ``projector`` (the constructor's
    # ``projector=`` overrides it for one optimizer).
    default_projector: str = "galore"
    # The rule's moments that are coordinates in the subspace and so move with it when a
    # projector re-projects at a refresh.
    reprojectable_moments: frozenset[str] = frozenset()
    # Whether a rank larger than a matrix's smaller dimension is an error (it is, unless a
    # method decides per parameter whether to project, as Flora's Adafactor does).
    rank_must_fit: bool = True
    # Whether the rule has kernels for ``fused=True``.
    has_fused: bool = False
    # Whether the rule's update of a block of rows needs only those rows (elementwise in the
    # subspace: AdamW, Lion). Under FSDP2 such a rule updates each rank's shard in place; a
    # rule that reduces across rows (Adafactor) works on gathered tensors
    # (``distributed.fsdp``).
    shard_local_rule: bool = True
    # Whether the rule needs the full gradient of the step at update time (APOLLO, Fira):
    # accumulation windows, which keep only its projection, are refused.
    needs_full_gradient: bool = False
    # Group keys a state dict of an older release may lack (filled in from the defaults).
    optional_group_keys: frozenset[str] = frozenset({"state_bits", "skip_nonfinite",
                                                     "foreach", "fused", "maximize"})

    def __init__(self, params: Iterable, defaults: dict[str, Any], *,
                 projector: str | None = None, foreach: bool | None = None,
                 fused: bool | None = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False) -> None:
        for flag, value in (("capturable", capturable), ("differentiable", differentiable)):
            if value:
                raise ValueError(
                    f"{flag}=True is not supported by {type(self).__name__}: "
                    + ("a subspace refresh is decided on the host, so a step cannot be "
                       "captured whole" if flag == "capturable" else
                       "its updates are not differentiable")
                )
        if fused and not self.has_fused:
            raise ValueError(f"fused=True: {type(self).__name__} has no fused implementation "
                             "(the kernels serve the AdamW rule); use foreach")
        # Read by add_param_group, which Optimizer.__init__ calls for every group.
        self._default_projector = projector or type(self).default_projector
        # Set by subspace_optim.step_in_backward while parameters step inside backward.
        self._backward_stepper = None
        # Global-clipping reference of layer-wise mode, loaded before a stepper exists.
        self._pending_clip_norm = None
        self._nonfinite_skips = 0
        # The projection keys each group held when last checked (``_check_group_keys``).
        self._group_keys: dict[int, tuple] = {}
        # Refreshes seen by this process (not in the state dict): per parameter (count, last
        # step, last seconds), the total, and the hooks (``register_refresh_hook``).
        self._refresh_log: dict[int, tuple[int, int, float]] = {}  # by id(p)
        self._refresh_total = 0
        self._refresh_hooks: OrderedDict[int, Callable] = OrderedDict()
        defaults = {**defaults, "foreach": foreach, "fused": fused, "maximize": maximize}
        defaults.setdefault("skip_nonfinite", False)
        # Hyperparameters are checked before the parameters, as torch's optimizers do, so
        # that a bad lr is reported as such whatever the params argument.
        self._validate_values(dict(defaults))
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
        # A log keyed by the parameters' ids and hooks belong to this object; a copy starts
        # its own.
        for key in ("_refresh_log", "_refresh_hooks"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by load_state_dict (with state and groups only): attributes that
        # already exist are kept; an unpickled or deep-copied optimizer gets fresh ones (its
        # copy is not attached to the original's backward hooks).
        had_flag = "differentiable" in self.__dict__.get("defaults", {})
        super().__setstate__(state)
        if not had_flag:
            # torch's __setstate__ adds this flag, which no group here holds (it is refused
            # as True): a second load_state_dict would then find groups lacking it.
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_default_projector", type(self).default_projector)
        self.__dict__.setdefault("_backward_stepper", None)
        self.__dict__.setdefault("_pending_clip_norm", None)
        self.__dict__.setdefault("_nonfinite_skips", 0)
        self.__dict__["_group_keys"] = {}  # groups may be new dicts: taken afresh
        self.__dict__.setdefault("_refresh_log", {})
        self.__dict__.setdefault("_refresh_total", 0)
        self.__dict__.setdefault("_refresh_hooks", OrderedDict())
        for key, value in (("skip_nonfinite", False), ("foreach", None), ("fused", None),
                           ("maximize", False)):
            self.defaults.setdefault(key, value)
            for group in self.param_groups:
                group.setdefault(key, value)
        for group in self.param_groups:
            group.setdefault("state_bits", None)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        given = set(param_group) if isinstance(param_group, dict) else {"params"}
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self.check_group(group, given)
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise
        if any(target_of(p) is not PARAMETER for p in group["params"]):
            # GradScaler then hands its scale to step() (see _loss_scaling_skips).
            self._step_supports_amp_scaling = True

    def check_group(self, group: dict, given: set[str] | None = None) -> None:
        """Validate ``group`` (defaults already filled in) and fill in its projector's
        defaults; raise ``ValueError`` naming the first bad key or value. ``given``: the
        keys the user wrote, for the warning about projection keys without ``rank``."""
        check_group_keys(group, self.defaults, type(self).__name__, given)
        self._validate_values(group)
        if group.get("fused") and not self.has_fused:
            raise ValueError(f"fused=True: {type(self).__name__} has no fused implementation")
        if "rank" in group:
            prepare_projected_group(group, self._default_projector, self.rank_must_fit)

    def _validate_values(self, group: dict) -> None:
        self._validate_lr(group)
        validate_common(group)
        self._validate_rule_group(group)

    def _validate_lr(self, group: dict) -> None:
        check_lr(group)

    def _validate_rule_group(self, group: dict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ stepping
    def implementation(self, group: dict) -> str:
        """``"reference"``, ``"foreach"`` or ``"fused"``, from the group's flags; with
        ``SUBSPACE_OPTIM_KERNELS=triton`` an unset ``fused`` means fused where the rule has
        kernels (forcing Triton forces the path that runs it)."""
        fused = group.get("fused")
        if fused is None and self.has_fused and group.get("foreach") is None and \
                ops.setting() == "triton":
            fused = True
        if fused:
            return "fused"
        return "reference" if group.get("foreach") is False else "foreach"

    # ------------------------------------------------------------------ refreshes
    @property
    def refresh_count(self) -> int:
        """How many subspace refreshes (SVDs, selections, resamples) this process ran."""
        return self._refresh_total

    def register_refresh_hook(self, hook: Callable[..., None]) -> Any:
        """Call ``hook(name, step, projector, seconds)`` after every refresh: the
        parameter's name (``param_names`` of its group, as torch's ``named_parameters``
        give them) or its 1-based index, the 0-based step it refreshed at, the projector's
        name and the refresh's cost in seconds (measured on the host; on a GPU after
        synchronising). Returns a handle with ``remove()``."""
        from torch.utils.hooks import RemovableHandle

        handle = RemovableHandle(self._refresh_hooks)
        self._refresh_hooks[handle.id] = hook
        return handle

    def last_refresh(self, p: Tensor) -> tuple[int, int, float] | None:
        """``(refreshes, last step, last seconds)`` of ``p`` in this process, or None."""
        return self._refresh_log.get(id(p))

    def refresh_observer(self, p: Tensor, step: int, group: dict) -> Callable[[float], None]:
        """What a refresh of ``p`` at ``step`` reports its cost to (see the hook)."""
        def observe(seconds: float) -> None:
            count = self._refresh_log.get(id(p), (0, None, None))[0]
            self._refresh_log[id(p)] = (count + 1, step, seconds)
            self._refresh_total += 1
            if self._refresh_hooks:
                name = self.param_name(p)
                for hook in list(self._refresh_hooks.values()):
                    hook(name, step, group.get("projector"), seconds)
        return observe

    def param_name(self, p: Tensor) -> str | int:
        """``p``'s name from its group's ``param_names`` (torch's named parameters), or
        its 1-based index in the optimizer."""
        for group in self.param_groups:
            for i, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    if names is not None and i < len(names):
                        return names[i]
        return self._param_index(p)

    # ------------------------------------------------------------------ group keys changed
    def check_group_changes(self, group: dict) -> None:
        """Take a change of ``group``'s projection keys since the last step into account:
        a bad value is a ``ValueError`` naming the key (the state is left as it was); a key
        that shapes the state (``rank``, ``projector``, ``proj_type``, ``state_bits``, a
        projector's layout keys) re-creates its parameters' state at this step, with a
        warning; the others (``update_proj_gap``, ``scale``, ...) take effect as they are."""
        keys = _watched_keys()
        current = tuple(group.get(k, _ABSENT) for k in keys)
        seen = self._group_keys.get(id(group))
        if seen is None or seen[0] is not group:
            self._group_keys[id(group)] = (group, current)
            return
        if seen[1] == current:
            return
        try:
            self.check_group(group)  # also fills in defaults of keys that were removed
        except (ValueError, RuntimeError) as error:
            names = ", ".join(repr(k) for k, a, b in zip(keys, seen[1], current, strict=True)
                              if a != b)
            raise type(error)(f"param group {self.param_groups.index(group)}: {names} changed "
                              f"since the last step and is now refused: {error}") from None
        current = tuple(group.get(k, _ABSENT) for k in keys)
        changed = [(k, a, b) for k, a, b in zip(keys, seen[1], current, strict=True) if a != b]
        layout = _state_layout_keys(group) | _state_layout_keys(
            {"projector": dict(zip(keys, seen[1], strict=True)).get("projector")})
        resetting = [(k, a, b) for k, a, b in changed if k in layout]
        if resetting:
            for p in group["params"]:
                self.state.pop(p, None)
            said = "; ".join(f"{k!r} {_shown(a)} -> {_shown(b)}" for k, a, b in resetting)
            warnings.warn(
                f"{type(self).__name__}: param group {self.param_groups.index(group)} changed "
                f"{said} since the last step: the optimizer state of its "
                f"{len(group['params'])} parameters (moments, subspace, step count) is created "
                "anew at this step.", UserWarning, stacklevel=4)
        self._group_keys[id(group)] = (group, current)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.check_group_changes(group)
        if getattr(self, "found_inf", None) is not None and self._loss_scaling_skips():
            return loss
        if self._backward_stepper is not None:
            # Parameters were updated inside backward; this call only closes the step.
            self._backward_stepper.close_step()
            return loss
        if engine.refresh_due(self):
            # A refresh (SVD with its fallback, selection, resample) decides on the host: the
            # whole step runs eagerly, outside any compiled graph, so that a steady step
            # compiles as one graph.
            self._eager_step()
        else:
            self._steady_step()
        return loss

    def _steady_step(self) -> None:
        for group in self.param_groups:
            engine.step_group(self, group, self.implementation(group))

    def _loss_scaling_skips(self) -> bool:
        """Called when ``torch.amp.GradScaler.step`` drives this optimizer, which it does
        itself (``_step_supports_amp_scaling``) when it holds gradients outside ``.grad``
        (INT8 weights) or steps inside backward: unscale what the scaler did not, refuse
        what cannot be made right, and say whether the step must be skipped (a NaN or inf
        gradient, as the scaler would)."""
        if self._backward_stepper is not None:
            raise RuntimeError(
                "step_in_backward (layer-wise mode) cannot be combined with torch.amp."
                "GradScaler: parameters step inside backward on the scaled gradients, before "
                "the scaler can unscale and check them (this step's updates were already "
                "applied). Train in bf16 without a scaler, or step with optimizer.step()")
        outside = held_outside_grad(p for g in self.param_groups for p in g["params"])
        if outside and not self.__dict__.pop("_outside_grads_unscaled", False):
            raise RuntimeError(
                f"{type(self).__name__} holds INT8 weights, whose gradients GradScaler cannot "
                "see (they live outside .grad): call subspace_optim.unscale_(scaler, "
                "optimizer) before scaler.step(optimizer), in place of scaler.unscale_")
        scale = getattr(self, "grad_scale", None)
        found = self.found_inf
        if scale is not None:  # the scaler unscaled nothing: do it for .grad
            grads: dict[tuple, list[Tensor]] = {}
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
            inv = scale.double().reciprocal().float()
            for (device, _), tensors in grads.items():
                # Their infs were already counted by the scaler (found): a scratch flag here.
                torch._amp_foreach_non_finite_check_and_unscale_(
                    tensors, torch.zeros((), device=device), inv.to(device))
        return bool(found > 0)

    @torch.compiler.disable
    def _eager_step(self) -> None:
        adapter = sharded.adapter()
        try:
            adapter.precompute_refreshes(self)
            self._steady_step()
        finally:
            adapter.discard_refreshes()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                target_of(p).zero_grad(p)

    def projects(self, p: Tensor, group: dict) -> bool:
        """Whether ``p`` is updated in a subspace: its group has ``rank`` and it is a
        non-empty matrix (tensors of more than two dimensions count as matrices)."""
        return "rank" in group and p.dim() >= 2 and p.numel() > 0

    # ------------------------------------------------------------------ per parameter
    def group_of(self, p: Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is p for q in g["params"]))

    @torch.no_grad()
    def step_parameter(self, p: Tensor, grad: Tensor | None = None, *,
                       window: Tensor | None = None, refreshed: bool = False,
                       group: dict | None = None) -> None:
        """Update ``p`` alone, now, from ``grad`` (default: its current gradient) or from an
        accumulated projected gradient ``window`` (see :meth:`take_window`; ``grad`` is then
        the window's last micro-batch, or ``None``). What updates in backward call."""
        group = group if group is not None else self.group_of(p)
        self.check_group_changes(group)
        if grad is None and window is None:
            grad = target_of(p).grad(p)
            if grad is None:
                return
        item = engine.prepare(self, p, group, grad, window=window, refreshed=refreshed)
        if item is not None:
            engine.run(self, [item], group, self.implementation(group))

    @torch.no_grad()
    def accumulate(self, p: Tensor, grad: Tensor, *, start: bool,
                   group: dict | None = None) -> None:
        """Add ``grad``, projected, to ``p``'s accumulation window (``start``: the window's
        first micro-batch, where its subspace is fixed and a due refresh happens)."""
        group = group or self.group_of(p)
        self._refuse_windows()
        if start:
            self.check_group_changes(group)
        accumulation.accumulate(self, p, grad, group, start)

    @torch.no_grad()
    def add_projected_gradient(self, p: Tensor, low: Tensor) -> None:
        """Deposit a gradient that arrives already projected (Grass's sparse layer) into
        ``p``'s window, where ``step`` (or the backward stepper) takes it."""
        self._refuse_windows()
        accumulation.add_projected(self, p, low)

    def _refuse_windows(self) -> None:
        if self.needs_full_gradient:
            raise RuntimeError(
                f"{type(self).__name__} scales the full gradient of the step, which an "
                "accumulation window (step_in_backward with accumulation_steps > 1) or a "
                "layer that forms only projected rows (GrassLinear) does not keep: use "
                "accumulation_steps=1 and plain linear layers")

    def take_window(self, p: Tensor) -> tuple[Tensor, bool] | None:
        """Remove ``p``'s finished window from its state: ``(projected gradient,
        refreshed)``, or ``None`` when a non-finite micro-batch spoiled it."""
        return accumulation.take(self, p)

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

    def _check_grad(self, p: Tensor, grad: Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients "
                f"(parameter of shape {tuple(p.shape)})"
            )
        if grad.dtype.is_complex or p.dtype.is_complex:
            raise RuntimeError(
                f"{type(self).__name__} does not support complex parameters or gradients "
                f"(parameter of shape {tuple(p.shape)}, dtype {p.dtype}); "
                "optimize torch.view_as_real(p) instead"
            )

    def _param_index(self, p: Tensor) -> int:
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        return next(i for i, q in enumerate(params, start=1) if q is p)

    # ------------------------------------------------------------------ the rule
    def _moment_specs(self, shape: tuple[int, ...], group: dict) -> dict[str, tuple[tuple, bool]]:
        """The rule's moments for a (projected) gradient of ``shape``: name -> (shape,
        signed)."""
        raise NotImplementedError

    def _run_rule(self, items: list[engine.Item], group: dict, impl: str) -> None:
        """Apply the rule to a bucket through the functional API: each item's ``low``
        (gradient in the compute dtype), ``moments`` (loaded), ``matrix`` (updated in
        place), ``basis``, ``side`` and ``step``."""
        raise NotImplementedError

    def _wants_raw_moments(self, group: dict, impl: str) -> bool:
        """Whether the rule reads and writes the stored moments itself (an 8-bit kernel
        that dequantises in registers), through ``_run_rule_raw`` instead of ``_run_rule``
        on loaded copies."""
        return False

    def _run_rule_raw(self, items: list[engine.Item], group: dict) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus an entry saying which optimizer wrote it and, in
        layer-wise mode, the global-clipping reference (the last step's total norm)."""
        state_dict = super().state_dict()
        if self._has_sharded_params():
            state_dict = sharded.adapter().present(self, state_dict)
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
        is_sharded = self._has_sharded_params()
        if is_sharded:
            state_dict = sharded.adapter().localize(self, state_dict)
        groups, state = checkpoint.prepare_load(self, state_dict)
        clip_norm = (state_dict.get(checkpoint.EXTRA_KEY) or {}).get("clip_norm")
        self.__setstate__({"state": defaultdict(dict, state), "param_groups": groups})
        self._pending_clip_norm = clip_norm
        if self._backward_stepper is not None:
            self._backward_stepper.clip_norm = clip_norm
        if is_sharded:
            sharded.adapter().after_load(self)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _has_sharded_params(self) -> bool:
        return any(sharded.is_sharded(p) for g in self.param_groups for p in g["params"])

    def host_state_keys(self, groups: list[dict] | None = None) -> frozenset[str]:
        """State keys kept on the CPU whatever the parameter's device (seeds, counters)."""
        names = {g["projector"] for g in (groups or self.param_groups) if "rank" in g}
        keys = frozenset({"sr_seed"})
        return keys.union(*(get_projector(n).host_state_keys for n in names))

    def expected_state_shapes(self, p: Tensor, group: dict) -> dict[str, tuple[int, ...]]:
        """The rule's moments this optimizer keeps for ``p`` in ``group``, with their shapes,
        for checking a state dict before loading it."""
        if self.projects(p, group):
            shape = matrix_shape(p.shape)
            side = resolve_side(shape, group["proj_type"])
            shape = projected_shape(shape, group["rank"], side)
        else:
            shape = tuple(p.shape)
        if sharded.is_sharded(p):  # this rank's part of it
            shape = sharded.adapter().local_rule_shape(self, p, group, shape)
        return {name: spec[0] for name, spec in self._moment_specs(shape, group).items()}
