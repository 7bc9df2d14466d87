"""Adafactor with subspace projection: ``SubspaceAdafactor`` and the drop-in ``GaLoreAdafactor``."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .._validate import check_bool, check_number, is_number, scalar_value
from ..functional import subspace_adafactor
from . import engine
from .base import SubspaceOptimizer
from .hyperparameters import host_hyperparameters


class SubspaceAdafactor(SubspaceOptimizer):
    """Adafactor (Shazeer & Stern 2018) with transformers' and galore-torch's semantics; in a
    projected group the second moment is factored over the *projected* gradient (rows and
    columns of the r x n or m x r matrix) and the update is back-projected times ``scale``.

    Per parameter, with ``lr_t = rho_t * max(eps[1], RMS(p))`` when ``scale_parameter`` and
    ``rho_t = min(1e-2 or 1e-6 t, 1/sqrt(t))`` when ``relative_step`` (else ``lr``)::

        u = G / sqrt(v_hat);  u /= max(1, RMS(u) / clip_threshold);  u *= lr_t
        if beta1: m = beta1 m + (1 - beta1) u;  u = m
        p <- p - weight_decay * lr_t * p - scale * project_back(u)

    Defaults are transformers' ``Adafactor`` (and ``galore_torch.GaLoreAdafactor``): lr None
    with relative_step, eps (1e-30, 1e-3), clip 1.0, decay_rate -0.8, beta1 None. Moments are
    kept in float32 (``state_bits=32``) as those implementations do for bf16 parameters.
    """

    rule_name = "adafactor"
    reprojectable_moments = frozenset({"exp_avg"})
    shard_local_rule = False  # factored moments and update clipping reduce across rows

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        projector: str | None = None,
        state_bits: int | None = 32,
        skip_nonfinite: bool = False,
        extra_defaults: dict[str, Any] | None = None,
        **flags: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
            "state_bits": state_bits,
            "skip_nonfinite": skip_nonfinite,
            **(extra_defaults or {}),
        }
        super().__init__(params, defaults, projector=projector, **flags)

    def _validate_lr(self, group: dict) -> None:
        for key in ("scale_parameter", "relative_step", "warmup_init"):
            check_bool(group, key)
        lr, relative = scalar_value(group["lr"], "lr"), group["relative_step"]
        if lr is None and not relative:
            raise ValueError("Invalid learning rate: None (pass lr, or relative_step=True)")
        if lr is not None and relative:
            raise ValueError(
                f"Invalid learning rate: {lr!r} cannot be combined with relative_step=True"
            )
        if lr is not None:
            check_number({"lr": lr}, "lr", 0.0, label="learning rate")
        if group["warmup_init"] and not relative:
            raise ValueError("Invalid warmup_init: True requires relative_step=True")

    def _validate_rule_group(self, group: dict) -> None:
        eps = group["eps"]
        if not isinstance(eps, (tuple, list)) or len(eps) != 2 or not all(
            is_number(e) and math.isfinite(e) and e >= 0 for e in eps
        ):
            raise ValueError(f"Invalid eps: {eps!r} (must be a pair of finite numbers >= 0)")
        check_number(group, "clip_threshold", 0.0, low_inclusive=False)
        decay_rate = group["decay_rate"]
        if not is_number(decay_rate) or not math.isfinite(decay_rate) or not decay_rate < 0:
            raise ValueError(f"Invalid decay_rate: {decay_rate!r} (must be a finite number < 0)")
        beta1 = group["beta1"]
        if beta1 is not None and (not is_number(beta1) or not 0 <= beta1 < 1):
            raise ValueError(f"Invalid beta1: {beta1!r} (must be None or in [0, 1))")

    def _moment_specs(self, shape: tuple[int, ...], group: dict) -> dict:
        specs = {}
        if group["beta1"]:
            specs["exp_avg"] = (shape, True)
        if len(shape) >= 2:
            specs["exp_avg_sq_row"] = (shape[:-1], False)
            specs["exp_avg_sq_col"] = (shape[:-2] + shape[-1:], False)
        else:
            specs["exp_avg_sq"] = (shape, False)
        return specs

    def _rule_kwargs(self, group: dict, impl: str) -> dict[str, Any]:
        hp = host_hyperparameters(group)
        return {"lr": hp["lr"], "eps": group["eps"], "clip_threshold": group["clip_threshold"],
                "decay_rate": group["decay_rate"], "beta1": group["beta1"],
                "weight_decay": group["weight_decay"],
                "scale_parameter": group["scale_parameter"],
                "relative_step": group["relative_step"], "warmup_init": group["warmup_init"],
                "maximize": group["maximize"], "impl": impl}

    def _run_rule(self, items: list[engine.Item], group: dict, impl: str) -> None:
        projected = items[0].projected
        subspace_adafactor(
            [it.matrix for it in items], [it.low for it in items], [it.basis for it in items],
            [it.moments for it in items], [it.step + 1 for it in items],
            projector=engine.item_projector(items, group),
            sides=[it.side for it in items], scale=group["scale"] if projected else 1.0,
            **self._rule_kwargs(group, impl),
        )


class GaLoreAdafactor(SubspaceAdafactor):
    """Drop-in for ``galore_torch.GaLoreAdafactor``: same defaults, same update. transformers'
    Trainer builds it with ``scale_parameter=False, relative_step=False`` and an ``lr``."""
