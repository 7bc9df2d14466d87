"""Lion with subspace projection."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._validate import check_betas
from ..functional import subspace_lion
from . import engine
from .base import SubspaceOptimizer
from .hyperparameters import host_hyperparameters, tensor_lr


class SubspaceLion(SubspaceOptimizer):
    """Lion (sign of an interpolated momentum) whose projected groups keep the momentum in
    the subspace and back-project the sign update, times ``scale``. Defaults are the Lion
    paper's: lr 1e-4, betas (0.9, 0.99), weight_decay 0 (decoupled, before the update).
    Lion has no fused kernel; ``foreach=False`` runs the per-tensor reference."""

    rule_name = "lion"
    reprojectable_moments = frozenset({"exp_avg"})

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        projector: str | None = None,
        state_bits: int | None = None,
        skip_nonfinite: bool = False,
        **flags: Any,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                    "state_bits": state_bits, "skip_nonfinite": skip_nonfinite}
        super().__init__(params, defaults, projector=projector, **flags)

    def _validate_rule_group(self, group: dict) -> None:
        check_betas(group)

    def _moment_specs(self, shape: tuple[int, ...], group: dict) -> dict:
        return {"exp_avg": (shape, True)}

    def _run_rule(self, items: list[engine.Item], group: dict, impl: str) -> None:
        hp = host_hyperparameters(group)
        beta1, beta2 = hp["betas"]
        projected = items[0].projected
        subspace_lion(
            [it.matrix for it in items], [it.low for it in items], [it.basis for it in items],
            [it.moments["exp_avg"] for it in items], [it.step + 1 for it in items],
            projector=engine.item_projector(items, group),
            sides=[it.side for it in items], lr=tensor_lr(group, impl, hp),
            beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            scale=group["scale"] if projected else 1.0, maximize=group["maximize"], impl=impl,
        )
