"""AdamW with subspace projection: ``SubspaceAdamW`` and the drop-in ``GaLoreAdamW``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import ops
from .._validate import check_betas, check_bool, check_choice, check_number
from ..functional import subspace_adamw
from ..functional._apply import apply_reference
from ..rules.adamw import CONVENTIONS, adamw_factor
from . import engine, moments
from .base import SubspaceOptimizer
from .hyperparameters import host_hyperparameters, tensor_lr

_FLAGS_DOC = """
        foreach, fused: torch's implementation flags: ``foreach`` (default, also for
            ``None``), the per-tensor reference with ``foreach=False``, the op seam's
            kernels with ``fused=True`` (see ``subspace_optim.functional``).
        maximize: maximise the objective instead (the gradient's sign is flipped).
        capturable, differentiable: accepted as False only (see ``optim.base``)."""


class SubspaceAdamW(SubspaceOptimizer):
    r"""AdamW whose projected param groups run Adam in a low-rank subspace of the gradient.

    A group without ``rank`` is updated exactly as by ``torch.optim.AdamW`` (decoupled
    weight decay). A group with ``rank`` projects each matrix parameter (more than 2-D:
    viewed as ``shape[0] x rest``; 1-D: full-rank update)::

        if step % update_proj_gap == 0:  basis <- projector.refresh(G)
        R = project(G);  m, v <- Adam moments of R
        W <- W - lr * scale * project_back(m_hat / (sqrt(v_hat) + eps))

    Args:
        params: parameters or param groups (galore-torch's group keys: ``rank``,
            ``update_proj_gap``, ``scale``, ``proj_type``, and ``projector``).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``, with its defaults.
        correct_bias: bias-correct the moments (transformers' flag; default True).
        convention: ``"torch"`` (default) or ``"galore"``: where eps enters and whether
            weight decay comes before or after the update (see ``rules.adamw``).
        state_bits: precision of the moments: ``None`` (the gradient's dtype), 32, 16
            (bfloat16) or 8 (block-wise, through bitsandbytes); see ``optim.moments``.
        skip_nonfinite: a parameter whose gradient has a NaN or an inf is not updated and
            its state is not touched (default False, as in torch, where one bad gradient
            poisons the moments for good).
        projector: the projector name used by groups that set ``rank`` but no
            ``projector`` (default: the class's ``default_projector``, ``"galore"``).
    """

    __doc__ += _FLAGS_DOC
    rule_name = "adamw"
    reprojectable_moments = frozenset({"exp_avg", "exp_avg_sq"})
    has_fused = True
    optional_group_keys = SubspaceOptimizer.optional_group_keys | {"correct_bias", "convention"}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        correct_bias: bool = True,
        convention: str = "torch",
        projector: str | None = None,
        state_bits: int | None = None,
        skip_nonfinite: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
            "convention": convention,
            "state_bits": state_bits,
            "skip_nonfinite": skip_nonfinite,
            **self._extra_defaults(),
        }
        super().__init__(params, defaults, projector=projector, foreach=foreach, fused=fused,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable)

    def _extra_defaults(self) -> dict[str, Any]:
        """Group keys a subclass's rule adds (with their defaults)."""
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("correct_bias", True)
            group.setdefault("convention", "torch")

    def _validate_rule_group(self, group: dict) -> None:
        check_betas(group)
        check_number(group, "eps", 0.0, label="epsilon value")
        check_choice(group, "convention", CONVENTIONS)
        check_bool(group, "correct_bias")

    def _moment_specs(self, shape: tuple[int, ...], group: dict) -> dict:
        return {"exp_avg": (shape, True), "exp_avg_sq": (shape, False)}

    def _hyperparameters(self, group: dict, impl: str) -> dict[str, Any]:
        hp = host_hyperparameters(group)
        beta1, beta2 = hp["betas"]
        return {"lr": tensor_lr(group, impl, hp), "beta1": beta1,
                "beta2": beta2, "eps": group["eps"], "weight_decay": group["weight_decay"],
                "correct_bias": group["correct_bias"], "convention": group["convention"],
                "maximize": group["maximize"]}

    def _run_rule(self, items: list[engine.Item], group: dict, impl: str) -> None:
        projected = items[0].projected
        subspace_adamw(
            [it.matrix for it in items], [it.low for it in items], [it.basis for it in items],
            [it.moments["exp_avg"] for it in items], [it.moments["exp_avg_sq"] for it in items],
            [it.step + 1 for it in items],
            projector=engine.item_projector(items, group),
            sides=[it.side for it in items], scale=group["scale"] if projected else 1.0,
            impl=impl, **self._hyperparameters(group, impl),
        )

    def _wants_raw_moments(self, group: dict, impl: str) -> bool:
        return impl == "fused" and group["state_bits"] == 8

    def _run_rule_raw(self, items: list[engine.Item], group: dict) -> None:
        """``fused=True`` with 8-bit states: the block-wise 8-bit op updates the codes
        themselves (moments under 4096 elements stay float32, as always)."""
        hp = self._hyperparameters(group, "fused")
        galore = hp["convention"] == "galore"
        projected = items[0].projected
        projector = engine.item_projector(items, group)
        scale = group["scale"] if projected else 1.0
        plain = []
        for it in items:
            specs = self._moment_specs(tuple(it.low.shape), group)
            state = it.state
            if "exp_avg" not in state:
                for name, (shape, signed) in specs.items():
                    moments.init_moment(state, name, shape, it.low, 8, signed,
                                        group.get("min_8bit_size", moments.MIN_8BIT_SIZE))
            if state["exp_avg"].dtype != torch.uint8:
                plain.append(it)
                continue
            step = it.step + 1
            direction = ops.blockwise8_adamw_update(
                it.low, state["exp_avg"], state["exp_avg" + moments.ABSMAX],
                state["exp_avg_sq"], state["exp_avg_sq" + moments.ABSMAX], step,
                hp["beta1"], hp["beta2"], hp["eps"], galore, hp["correct_bias"],
                hp["maximize"])
            factor = adamw_factor(step, hp["beta1"], hp["beta2"], hp["correct_bias"],
                                  hp["convention"])
            apply_reference(it.matrix, direction, it.basis, projector,
                            it.side if projected else None, scale, hp["lr"] * factor,
                            hp["lr"] * hp["weight_decay"], decay_after=galore)
        if plain:
            engine.load_moments(self, plain, group)
            self._run_rule(plain, group, "fused")
            engine.store_moments(self, plain, group)


class GaLoreAdamW(SubspaceAdamW):
    """Drop-in for ``galore_torch.GaLoreAdamW``: same defaults (lr 1e-3, betas (0.9, 0.999),
    eps 1e-6, weight_decay 0, bias correction on) and the same update in every group,
    including galore-torch's eps placement and weight decay after the update
    (``convention="galore"``). ``no_deprecation_warning`` is accepted for call-site
    compatibility and ignored: nothing here is deprecated.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        convention: str = "galore",
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, convention=convention, **kwargs)

