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

from torch import Tensor

from .._validate import check_bool
from ..functional import subspace_adafactor
from ..projectors.base import Side, get_projector
from . import engine
from .adafactor import SubspaceAdafactor

_FLORA = "flora"


class FloraAdafactor(SubspaceAdafactor):
    """Adafactor with Flora-compressed momentum; see the module docstring. It runs the one
    step path of the library (Adafactor's rule in Flora's order), so state precision
    (``state_bits``, default 32 as in the reference), INT8 weights and the implementation
    flags work as for every class."""

    rule_name = "flora_adafactor"
    default_projector = _FLORA
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
        state_bits: int | None = 32,
        skip_nonfinite: bool = False,
        **flags: Any,
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
            relative_step, warmup_init, projector=_FLORA, state_bits=state_bits,
            skip_nonfinite=skip_nonfinite, extra_defaults=extra, **flags,
        )

    def _validate_rule_group(self, group: dict) -> None:
        super()._validate_rule_group(group)
        check_bool(group, "factorize_second_moment")

    def projects(self, p: Tensor, group: dict) -> bool:
        # Flora compresses the momentum only; it takes (and accumulates) full gradients.
        return False

    @staticmethod
    def _compressed(group: dict, shape: tuple[int, ...]) -> bool:
        """Flora's rule: a factored matrix with min(shape) >= rank and max/min <= 4 (so
        embeddings keep their momentum at full size)."""
        factored = len(shape) == 2 and group["factorize_second_moment"]
        if not (group["beta1"] and "rank" in group and factored):
            return False
        return min(shape) >= group["rank"] and max(shape) / min(shape) <= 4

    @staticmethod
    def _side(shape: tuple[int, ...]) -> Side:
        return Side.LEFT if shape[0] < shape[-1] else Side.RIGHT

    def _moment_specs(self, shape: tuple[int, ...], group: dict) -> dict:
        factored = len(shape) == 2 and group["factorize_second_moment"]
        specs = {}
        if group["beta1"]:
            if self._compressed(group, shape):
                m, n = shape
                r = group["rank"]
                specs["exp_avg"] = ((r, n) if self._side(shape) == Side.LEFT else (m, r), True)
            else:
                specs["exp_avg"] = (shape, True)
        if factored:
            specs["exp_avg_sq_row"] = (shape[:-1], False)
            specs["exp_avg_sq_col"] = (shape[:-2] + shape[-1:], False)
        else:
            specs["exp_avg_sq"] = (shape, False)
        return specs

    def _momentum_bases(self, item: engine.Item, group: dict) -> tuple[Any, Any] | None:
        """The momentum's basis of this step and, when the step resamples (step % kappa ==
        0, 1-based, as in the reference), the new one."""
        shape = tuple(item.low.shape)
        if not self._compressed(group, shape):
            return None
        projector = get_projector(_FLORA)
        state, side = item.state, self._side(shape)
        if "proj_seed" not in state:
            projector.init_state(state, group, self._param_index(item.p))
        basis = projector.basis(state, group, item.low, side)
        if (item.step + 1) % group["update_proj_gap"] != 0:
            return basis, None
        projector.refresh(state, group, item.low, side)
        return basis, projector.basis(state, group, item.low, side)

    def _run_rule(self, items: list[engine.Item], group: dict, impl: str) -> None:
        momentum = [self._momentum_bases(it, group) for it in items]
        subspace_adafactor(
            [it.matrix for it in items], [it.low for it in items], [None] * len(items),
            [it.moments for it in items], [it.step + 1 for it in items],
            flora_momentum=True, momentum_projector=get_projector(_FLORA),
            momentum_bases=momentum, momentum_sides=[self._side(tuple(it.low.shape))
                                                     for it in items],
            **self._rule_kwargs(group, impl),
        )

