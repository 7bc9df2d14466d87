"""AdamW with subspace projection: ``SubspaceAdamW`` and the drop-in ``GaLoreAdamW``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .._validate import check_betas, check_bool, check_choice, check_number
from ..rules.adamw import CONVENTIONS, adamw_update
from .base import RuleStep, SubspaceOptimizer


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

    rule_name = "adamw"
    reprojectable_moments = frozenset({"exp_avg", "exp_avg_sq"})
    default_projector = "galore"
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
        }
        super().__init__(params, defaults, projector=projector or self.default_projector)

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

    def _moment_specs(self, grad: Tensor, group: dict) -> dict:
        return {"exp_avg": (tuple(grad.shape), True), "exp_avg_sq": (tuple(grad.shape), False)}

    def _rule_update(
        self, grad: Tensor, moments: dict[str, Tensor], group: dict, step: int, param: Tensor
    ) -> RuleStep:
        beta1, beta2 = group["betas"]
        direction, factor = adamw_update(
            grad,
            moments["exp_avg"],
            moments["exp_avg_sq"],
            step,
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            correct_bias=group["correct_bias"],
            convention=group["convention"],
        )
        lr = group["lr"]
        return RuleStep(direction, lr * factor, lr * group["weight_decay"],
                        decay_after=group["convention"] == "galore")


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
        projector: str | None = None,
        state_bits: int | None = None,
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            convention=convention,
            projector=projector,
            state_bits=state_bits,
            skip_nonfinite=skip_nonfinite,
        )
