"""Flora's own algorithm: Adafactor whose momentum is compressed by a seeded random
projection (Hao et al., ICML 2024; reference code BorealisAI/flora-opt, ``Flora``).

Per parameter, with ``u`` the Adafactor-normalised gradient (factored second moment on the
*full* gradient for matrices)::

    update = (1 - b1) u + b1 up(M)                 # M: r x n or m x r, never full-size
    if t % kappa == 0: seed <- next(seed); M <- down_new(up_old(M))
    M <- b1 M + (1 - b1) down(u)
    update <- update / max(1, RMS(update) / clip_threshold)
    p <- p - wd lr_t p - lr_t update,  lr_t = lr * max(eps2, RMS(p)) if scale_parameter

A matrix's momentum is compressed when its group has ``rank``, it is 2-D, the second
moment is factored, ``min(shape) >= rank`` and ``max / min <= 4`` (Flora's rule, which
leaves embeddings uncompressed); other parameters are plain Adafactor with momentum.
The seed lives in the state as an int64 tensor (``proj_seed``) and the projection is the
``flora`` projector's, so ``FloraAdamW`` and this class draw the same matrices.
Defaults are the reference class's, except ``beta1 = 0.9`` from Flora's configuration
(the class's ``None`` disables the momentum that Flora exists to compress).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._validate import check_bool
from ..projectors.base import get_projector
from ..rules import adafactor as af
from .adafactor import SubspaceAdafactor
from .base import host_hyperparameters

_FLORA = "flora"


class FloraAdafactor(SubspaceAdafactor):
    """Adafactor with Flora-compressed momentum; see the module docstring."""

    rule_name = "flora_adafactor"
    rank_must_fit = False

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        rank: int | None = None,
        kappa: int = 1000,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = 0.9,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = False,
        warmup_init: bool = False,
        factorize_second_moment: bool = True,
        seed: int = 0,
        *,
        skip_nonfinite: bool = False,
    ) -> None:
        extra: dict[str, Any] = {
            "factorize_second_moment": factorize_second_moment,
            "update_proj_gap": kappa,
            "seed": seed,
        }
        if rank is not None:
            extra["rank"] = rank
        super().__init__(
            params, lr, eps, clip_threshold, decay_rate, beta1, weight_decay, scale_parameter,
            relative_step, warmup_init, projector=_FLORA, state_bits=None,
            skip_nonfinite=skip_nonfinite, extra_defaults=extra,
        )

    def _validate_rule_group(self, group: dict) -> None:
        super()._validate_rule_group(group)
        check_bool(group, "factorize_second_moment")

    def projects(self, p: Tensor, group: dict) -> bool:
        # Flora compresses the momentum only; it takes (and accumulates) full gradients.
        return False

    @staticmethod
    def _compressed(group: dict, shape: torch.Size, factored: bool) -> bool:
        beta1 = group["beta1"]
        if not (beta1 and "rank" in group and factored):
            return False
        return min(shape) >= group["rank"] and max(shape) / min(shape) <= 4

    def expected_state_shapes(self, p: Tensor, group: dict) -> dict[str, tuple[int, ...]]:
        shape = tuple(p.shape)
        factored = len(shape) == 2 and group["factorize_second_moment"]
        out = {}
        if group["beta1"]:
            compressed = self._compressed(group, p.shape, factored)
            if compressed:
                m, n = shape
                r = group["rank"]
                out["exp_avg"] = (r, n) if m < n else (m, r)
            else:
                out["exp_avg"] = shape
        if factored:
            out["exp_avg_sq_row"], out["exp_avg_sq_col"] = shape[:-1], shape[:-2] + shape[-1:]
        else:
            out["exp_avg_sq"] = shape
        return out

    def _step_param(self, p: Tensor, grad: Tensor, group: dict) -> None:
        self._check_grad(p, grad)
        if self._skips_nonfinite(group, grad):
            return
        group = host_hyperparameters(group)
        state = self.state[p]
        g = grad.float()
        p32 = p if p.dtype == torch.float32 else p.float()
        factored = g.dim() == 2 and group["factorize_second_moment"]
        compressed = self._compressed(group, g.shape, factored)
        side = "left" if g.shape[0] < g.shape[-1] else "right"
        projector = get_projector(_FLORA)
        if "step" not in state:
            self._init_state(p, state, g, group, factored, compressed, side)
        step = state["step"] + 1

        lr_t = af.relative_step_size(group["lr"], step, group["relative_step"],
                                     group["warmup_init"])
        if group["scale_parameter"]:
            lr_t = af.rms(p32).clamp(min=group["eps"][1]) * lr_t
        beta2 = af.decay_beta2(step, group["decay_rate"])
        eps1 = group["eps"][0]
        if factored:
            update = af.factored_preconditioned(
                g, state["exp_avg_sq_row"], state["exp_avg_sq_col"], beta2, eps1
            )
        else:
            update = af.full_preconditioned(g, state["exp_avg_sq"], beta2, eps1)

        beta1 = group["beta1"]
        if beta1 and not compressed:
            update = update * (1 - beta1) + state["exp_avg"] * beta1
            state["exp_avg"].copy_(update)
        elif compressed:
            basis = projector.basis(state, side, g, group)
            raw = update
            momentum = projector.project_back(basis, state["exp_avg"], side)
            update = raw * (1 - beta1) + momentum * beta1
            if step % group["update_proj_gap"] == 0:
                projector.refresh(state, g, side, group)
                new_basis = projector.basis(state, side, g, group)
                state["exp_avg"] = projector.reproject(basis, new_basis, state["exp_avg"], side)
                basis = new_basis
            state["exp_avg"] = state["exp_avg"] * beta1 + projector.project(basis, raw, side) * (
                1 - beta1
            )

        af.clip_by_rms_(update, group["clip_threshold"])
        update = update * lr_t
        if group["weight_decay"] != 0:
            p32.add_(p32 * (-group["weight_decay"] * lr_t))
        p32.sub_(update)
        if p32 is not p:
            p.copy_(p32)
        state["step"] = step

    def _init_state(
        self, p: Tensor, state: dict, g: Tensor, group: dict, factored: bool, compressed: bool,
        side: str,
    ) -> None:
        state["step"] = 0
        if compressed:
            get_projector(_FLORA).init_state(state, self._param_index(p), group)
            m, n = g.shape
            r = group["rank"]
            state["exp_avg"] = g.new_zeros((r, n) if side == "left" else (m, r))
        elif group["beta1"]:
            state["exp_avg"] = torch.zeros_like(g)
        if factored:
            state["exp_avg_sq_row"] = g.new_zeros(g.shape[:-1])
            state["exp_avg_sq_col"] = g.new_zeros(g.shape[:-2] + g.shape[-1:])
        else:
            state["exp_avg_sq"] = torch.zeros_like(g)
