"""Online Subspace Descent (Liang et al., "Memory-Efficient LLM Training with Online
Subspace Descent", NeurIPS 2024, arXiv 2408.12857; reference code
kyleliang919/Online-Subspace-Descent).

The basis starts as the SVD basis of the first gradient. After that no SVD is taken:
every step, once the weight has been updated with the current basis ``P_t``, ``P`` takes
one AdamW step on the online-PCA loss of the normalised gradient ``A = G / ||G||_F``::

    right (P is r x n):  L(P) = ||A P^T P - A||_F^2
    left  (P is m x r):  L(P) = ||P P^T A - A||_F^2

The gradient is computed in closed form (O(rmn), no n x n product), e.g. on the right
``dL/dP = 2 (P E^T A + P A^T E)`` with ``E = A P^T P - A``. The weight's moments are never
reset and ``P`` is never re-orthonormalised. ``P``'s own AdamW moments and step count live
in the state (``proj_exp_avg``, ``proj_exp_avg_sq``, ``proj_steps``).

``osd_variant="code"`` (default, the reference code): ``P``'s learning rate is
``(1/T) * lr_t / lr_0`` (T = ``update_proj_gap``, lr_0 the group's ``initial_lr`` that torch
schedulers record), AdamW's default weight decay 0.01, no orthogonality term.
``osd_variant="paper"`` (Algorithm 1): the loss adds ``ortho_penalty * ||P P^T - I||^2``
(lambda = 0.1), ``P``'s learning rate is ``pca_lr_ratio * lr_t`` (alpha = 5) and its weight
decay is the group's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validate import check_choice, check_number
from ..rules.adamw import adamw_update
from .base import MatrixProjector, Side, register_projector, working_dtype
from .svd import SVD_DEFAULTS, refreshed_basis, validate_svd_keys

VARIANTS = ("code", "paper")
# torch.optim.AdamW's defaults, which the reference's basis optimizer uses.
_P_BETAS = (0.9, 0.999)
_P_EPS = 1e-8
_P_WEIGHT_DECAY_CODE = 0.01


def pca_loss_grad(basis: Tensor, a: Tensor, side: Side) -> Tensor:
    """Gradient of the online-PCA loss with respect to the basis (see module docstring)."""
    p = basis
    if side == "right":
        e = (a @ p.T) @ p - a
        return 2 * ((p @ e.T) @ a + (p @ a.T) @ e)
    e = p @ (p.T @ a) - a
    return 2 * (e @ (a.T @ p) + a @ (e.T @ p))


def orthogonality_grad(basis: Tensor, side: Side) -> Tensor:
    """Gradient of ``||P P^T - I||^2`` (right, r x n) or ``||P^T P - I||^2`` (left)."""
    p = basis
    if side == "right":
        gram = p @ p.T
        return 4 * (gram - torch.eye(gram.shape[0], device=p.device, dtype=p.dtype)) @ p
    gram = p.T @ p
    return 4 * p @ (gram - torch.eye(gram.shape[0], device=p.device, dtype=p.dtype))


class OnlinePCAProjector(MatrixProjector):
    """SVD once, then one AdamW step per step on the online-PCA loss; state ``proj_basis``."""

    name = "online_pca"
    param_dtype_state_keys = frozenset({"proj_basis"})
    defaults = {"osd_variant": "code", "ortho_penalty": 0.1, "pca_lr_ratio": 5.0,
                **SVD_DEFAULTS}
    # SVD once; after that the basis is learned, never recomputed.
    basis_key = "proj_basis"
    periodic = False

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        validate_svd_keys(group)
        check_choice(group, "osd_variant", VARIANTS)
        check_number(group, "ortho_penalty", 0)
        check_number(group, "pca_lr_ratio", 0)
        if group["osd_variant"] == "paper" and group.get("lr") is None:
            raise ValueError(
                "Invalid osd_variant: 'paper' sets the basis's learning rate from the group's "
                "lr, and this group has none (lr=None: Adafactor's relative steps); pass an lr "
                "or use osd_variant='code'"
            )

    def refresh(self, state: dict, group: dict, grad: Tensor, side: Side) -> None:
        basis = refreshed_basis(state, grad, group["rank"], side, group)
        if basis is None:
            return None
        state["proj_basis"] = basis.to(grad.dtype)
        # P's own AdamW moments stay float32 whatever the weight's dtype (float64 in a
        # float64 run): in fp16 the squared loss gradient underflows and eps 1e-8 rounds to
        # 0, and P turns NaN.
        work = working_dtype(grad)
        state["proj_exp_avg"] = torch.zeros_like(state["proj_basis"], dtype=work)
        state["proj_exp_avg_sq"] = torch.zeros_like(state["proj_basis"], dtype=work)
        state["proj_steps"] = 0
        return None

    def basis(self, state: dict, group: dict, grad: Tensor, side: Side) -> Tensor:
        return state["proj_basis"]

    def after_update(self, state: dict, group: dict, grad: Tensor, side: Side, basis: Tensor,
                     refreshed: bool) -> None:
        if refreshed:  # the reference takes no basis step on the SVD step
            return
        stored = state["proj_basis"]
        # The basis step is computed in float32 (float64 in a float64 run) and the basis
        # stored back in its own dtype (the gradient's, as the reference keeps it); for fp32
        # weights this is in place.
        work = state["proj_exp_avg"].dtype
        p = stored.to(work)
        tiny = torch.finfo(work).tiny
        g = grad.to(work)
        a = g / g.norm().clamp(min=tiny)
        grad_p = pca_loss_grad(p, a, side)
        if group["osd_variant"] == "paper":
            grad_p.add_(orthogonality_grad(p, side), alpha=group["ortho_penalty"])
            lr_p = group["pca_lr_ratio"] * group["lr"]
            wd_p = group["weight_decay"]
        else:
            lr, initial = group["lr"], group.get("initial_lr", group["lr"])
            if isinstance(lr, Tensor) or isinstance(initial, Tensor):
                # A tensor lr (compiled steps): no host read, no branch on its value.
                ratio = torch.where(torch.as_tensor(initial) != 0, lr / initial, 1.0)
            else:
                ratio = lr / initial if initial else 1.0
            lr_p = ratio / group["update_proj_gap"]
            wd_p = _P_WEIGHT_DECAY_CODE
        step = state["proj_steps"] + 1
        p.mul_(1 - lr_p * wd_p)
        direction, factor = adamw_update(
            grad_p, state["proj_exp_avg"], state["proj_exp_avg_sq"], step,
            beta1=_P_BETAS[0], beta2=_P_BETAS[1], eps=_P_EPS, convention="torch",
        )
        if isinstance(lr_p, Tensor):
            p.add_(direction * (-lr_p * factor))
        else:
            p.add_(direction, alpha=-lr_p * factor)
        if p is not stored:
            stored.copy_(p)
        state["proj_steps"] = step


register_projector(OnlinePCAProjector())
