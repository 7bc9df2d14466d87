"""Lion with subspace projection."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .._validate import check_betas
from ..rules.lion import lion_update
from .base import RuleStep, SubspaceOptimizer


class SubspaceLion(SubspaceOptimizer):
    """Lion (sign of an interpolated momentum) whose projected groups keep the momentum in
    the subspace and back-project the sign update, times ``scale``. Defaults are the Lion
    paper's: lr 1e-4, betas (0.9, 0.99), weight_decay 0 (decoupled, before the update)."""

    rule_name = "lion"
    reprojectable_moments = frozenset({"exp_avg"})
    default_projector = "galore"

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
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                    "state_bits": state_bits, "skip_nonfinite": skip_nonfinite}
        super().__init__(params, defaults, projector=projector or self.default_projector)

    def _validate_rule_group(self, group: dict) -> None:
        check_betas(group)

    def _moment_specs(self, grad: Tensor, group: dict) -> dict:
        return {"exp_avg": (tuple(grad.shape), True)}

    def _rule_update(
        self, grad: Tensor, moments: dict[str, Tensor], group: dict, step: int, param: Tensor
    ) -> RuleStep:
        beta1, beta2 = group["betas"]
        direction = lion_update(grad, moments["exp_avg"], beta1=beta1, beta2=beta2)
        return RuleStep(direction, group["lr"], group["lr"] * group["weight_decay"])
