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

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._validate import is_int, is_number
from ..projectors.base import (
    REPROJECT,
    RESET,
    Projector,
    get_projector,
    matrix_shape,
    resolve_side,
)


class SubspaceOptimizer(Optimizer):
    """Base class: a ``torch.optim.Optimizer`` whose projected groups update in a subspace."""

    # Names of the inner rule's per-parameter moments, and which of them must stay >= 0
    # when carried into a new subspace (set by each rule's subclass).
    moment_names: tuple[str, ...] = ()
    nonnegative_moments: frozenset[str] = frozenset()
    # Whether a rank larger than a matrix's smaller dimension is an error (it is, unless a
    # method decides per parameter whether to project, as Flora's Adafactor does).
    rank_must_fit: bool = True

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, projector: str) -> None:
        # Read by add_param_group, which Optimizer.__init__ calls for every group.
        self._default_projector = projector
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_common(group)
            self._validate_rule_group(group)
            if "rank" in group:
                self._prepare_projected_group(group)
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_common(self, group: dict) -> None:
        self._validate_lr(group)
        wd = group["weight_decay"]
        if not is_number(wd) or not wd >= 0:
            raise ValueError(f"Invalid weight_decay value: {wd!r} (must be a float >= 0)")

    def _validate_lr(self, group: dict) -> None:
        lr = group["lr"]
        if not is_number(lr) or not lr >= 0:
            raise ValueError(f"Invalid learning rate: {lr!r} (must be a float >= 0)")

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
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_param(p, p.grad, group)
        return loss

    def _step_param(self, p: Tensor, grad: Tensor, group: dict) -> None:
        """Update one parameter from ``grad``; the unit that per-layer stepping will call."""
        self._check_grad(p, grad)
        state = self.state[p]
        step = state.get("step", 0)
        if "rank" in group and p.dim() >= 2:
            self._step_projected(p, grad, group, state, step)
        else:
            direction, factor = self._rule(grad, state, group, step)
            self._apply(p, group, factor, lambda alpha: p.add_(direction, alpha=alpha))
        state["step"] = step + 1

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

    def _step_projected(self, p: Tensor, grad: Tensor, group: dict, state: dict, step: int) -> None:
        projector = get_projector(group["projector"])
        g = grad.reshape(matrix_shape(p.shape))
        side = resolve_side(g.shape, group["proj_type"])
        if "step" not in state:
            projector.init_state(state, self._param_index(p), group)
        refreshed = projector.needs_refresh(state, step, group)
        basis, low = self._project(projector, state, g, side, group, refreshed)
        direction, factor = self._rule(low, state, group, step)
        target = p.view(g.shape) if p.is_contiguous() else p.contiguous().view(g.shape)

        def add_back(alpha: float) -> None:
            projector.add_back_(basis, direction, side, target, alpha)

        self._apply(target, group, factor * group["scale"], add_back)
        if target.data_ptr() != p.data_ptr():
            p.copy_(target.view_as(p))
        projector.after_update(state, g, side, basis, group, refreshed)

    def _param_index(self, p: Tensor) -> int:
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        return next(i for i, q in enumerate(params, start=1) if q is p)

    def _project(
        self, projector: Projector, state: dict, g: Tensor, side: str, group: dict,
        refresh: bool,
    ) -> tuple[Any, Tensor]:
        low = None
        if refresh:
            policy = projector.moment_policy(group)
            has_moments = all(name in state for name in self.moment_names)
            old_basis = None
            if policy == REPROJECT and has_moments:
                old_basis = projector.basis(state, side, g, group)
            low = projector.refresh(state, g, side, group)
            basis = projector.basis(state, side, g, group)
            if has_moments and policy == RESET:
                for name in self.moment_names:
                    state[name].zero_()
            elif old_basis is not None:
                for name in self.moment_names:
                    moved = projector.reproject(old_basis, basis, state[name], side)
                    if name in self.nonnegative_moments:
                        moved.abs_()
                    state[name] = moved.to(state[name].dtype)
        else:
            basis = projector.basis(state, side, g, group)
        if low is None:
            low = projector.project(basis, g, side)
        return basis, low

    def _rule(self, grad: Tensor, state: dict, group: dict, step: int) -> tuple[Tensor, float]:
        if not all(name in state for name in self.moment_names):
            for name in self.moment_names:
                state[name] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        return self._rule_update(grad, state, group, step + 1)

    def _rule_update(
        self, grad: Tensor, state: dict, group: dict, step: int
    ) -> tuple[Tensor, float]:
        """Update the moments from ``grad``; return ``(N, c)`` (update ``-lr * c * N``)."""
        raise NotImplementedError

    @staticmethod
    def _apply(
        target: Tensor, group: dict, factor: float, add_update: Callable[[float], None]
    ) -> None:
        """Decoupled weight decay around ``target += -lr * factor * update``, in the order
        of the group's convention (torch decays before the update, galore-torch after)."""
        lr, wd = group["lr"], group["weight_decay"]
        convention = group.get("convention", "torch")
        if convention == "torch" and wd != 0:
            target.mul_(1 - lr * wd)
        add_update(-lr * factor)
        if convention == "galore" and wd > 0:
            target.add_(target, alpha=-lr * wd)

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like ``torch.optim.Optimizer.load_state_dict`` but keep every state tensor's
        saved dtype.

        Torch casts floating state to the parameter's dtype, which would turn an fp32
        basis of a bf16 parameter into bf16 and integer codes or seeds into floats. Here
        state tensors only move: to the parameter's device, or to the CPU for the keys a
        projector declares host-side.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        host_keys = self._host_state_keys()
        for saved_id, p in zip(saved_ids, params, strict=True):
            if saved_id not in saved_state:
                continue
            self.state[p] = {
                key: _place(value, "cpu" if key in host_keys else p.device)
                for key, value in saved_state[saved_id].items()
            }

    def _host_state_keys(self) -> frozenset[str]:
        names = {g["projector"] for g in self.param_groups if "rank" in g}
        return frozenset().union(*(get_projector(n).host_state_keys for n in names))


def _place(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device=device)
    if isinstance(value, dict):
        return {k: _place(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_place(v, device) for v in value)
    return value
