"""Q-GaLore's projector: GaLore's SVD basis stored in INT4, refreshed lazily per layer
(Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
Low-Rank Gradients", arXiv 2407.08296; reference code VITA-Group/Q-GaLore).

Storage: the basis is quantised group-wise (``quant_group_size`` = 256 consecutive
elements, asymmetric min-max, zero inside the range) to ``quant_n_bit`` = 4 bits packed
two per byte (``subspace_optim.quant``). Projection and back-projection take the packed
form (``ops.int4_project``): the PyTorch implementation dequantises it on use, a kernel in
registers.

Lazy refresh (reference behaviour): at every SVD the cosine similarity between the new
first singular vector and the previous one is pushed onto a FIFO of ``queue_size`` = 5;
when the FIFO is full and its mean reaches ``cos_threshold`` = 0.4 the layer's gap is
multiplied by ``gamma_proj`` = 2 (truncated to an int). The FIFO is not cleared, so the gap
can double again at the next SVD. Refreshes fire when ``step % gap == 0``. The previous
vector is read from the stored (dequantised) basis rather than kept as an extra float copy;
INT4 noise moves a cosine by about 1e-2 at most, far below the threshold's resolution.

A singular vector is defined up to sign, so an SVD can return ``-v`` for an unchanged
subspace and the reference counts that as dissimilar (cosine -1). ``cos_abs=True`` compares
``|cos|`` instead; the default keeps the reference's signed cosine.

State: ``proj_codes`` (uint8), ``proj_scales`` (float32), ``proj_zeros`` (uint8), on the
host ``proj_queue`` (float32, ``queue_size``), and the plain ints ``proj_gap`` and
``proj_queue_len`` (read every step to decide a refresh: an int needs no device read).
Only ``proj_type="std"`` is supported, as in the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from .._validate import check_bool, check_choice, check_number, check_positive_int
from ..ops.int4 import dequantized_basis
from ..quant import quantize_groupwise
from .base import Projector, Side, register_projector, working_dtype
from .svd import SVD_DEFAULTS, refreshed_basis, validate_svd_keys


class PackedBasis(NamedTuple):
    """Q-GaLore's transient basis: the stored codes, scales and zero-points, the matrix
    shape (``r x n`` or ``m x r``), the code width and group, and the dtype it is used in
    (the gradient's). Projection works on the packed form (``ops.int4_project``)."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    shape: tuple[int, int]
    bits: int
    group_size: int
    dtype: torch.dtype

    def dense(self) -> Tensor:
        return dequantized_basis(self.codes, self.scales, self.zeros, *self.shape, self.bits,
                                 self.group_size, self.dtype)


class QGaLoreProjector(Projector):
    """INT4 SVD basis with layer-adaptive lazy refresh."""

    name = "q_galore"
    proj_types = ("std",)
    defaults = {"quant_n_bit": 4, "quant_group_size": 256, "cos_threshold": 0.4,
                "gamma_proj": 2, "queue_size": 5, "cos_abs": False, **SVD_DEFAULTS}
    host_state_keys = frozenset({"proj_queue"})
    state_layout_keys = frozenset({"quant_n_bit", "quant_group_size", "queue_size"})
    basis_key = "proj_codes"
    refresh_on_owner = True

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        validate_svd_keys(group)
        check_choice(group, "quant_n_bit", (4, 8))
        check_positive_int(group, "quant_group_size")
        check_positive_int(group, "queue_size")
        check_number(group, "cos_threshold", -1, 1)
        check_number(group, "gamma_proj", 1)
        check_bool(group, "cos_abs")

    def needs_refresh(self, state: dict, group: dict, step: int) -> bool:
        # The layer's own gap, a plain int (older checkpoints hold a 0-d tensor).
        return "proj_codes" not in state or step % int(state["proj_gap"]) == 0

    def refresh(self, state: dict, group: dict, grad: Tensor, side: Side) -> None:
        new = refreshed_basis(state, grad, group["rank"], side, group)
        if new is None:
            return None
        new = new.to(grad.dtype)
        if "proj_codes" in state:
            old = self.basis(state, group, grad, side).dense()
            self._observe(state, _first_vector(old, side), _first_vector(new, side), group)
        else:
            state["proj_gap"] = group["update_proj_gap"]
            state["proj_queue"] = torch.zeros(group["queue_size"], dtype=torch.float32)
            state["proj_queue_len"] = 0
        codes, scales, zeros = quantize_groupwise(
            new, group["quant_n_bit"], group["quant_group_size"]
        )
        state["proj_codes"], state["proj_scales"], state["proj_zeros"] = codes, scales, zeros
        return None

    @staticmethod
    def _observe(state: dict, old: Tensor, new: Tensor, group: dict) -> None:
        work = working_dtype(new)
        cos = F.cosine_similarity(old.to(work), new.to(work), dim=0)
        if group["cos_abs"]:
            cos = cos.abs()
        queue, length = state["proj_queue"], int(state["proj_queue_len"])
        size = queue.numel()
        if length == size:
            queue = torch.cat((queue[1:], cos.reshape(1).cpu()))
        else:
            queue = queue.clone()
            queue[length] = cos.cpu()
            length += 1
        state["proj_queue"] = queue
        state["proj_queue_len"] = length
        if length == size and float(queue.mean()) >= group["cos_threshold"]:
            state["proj_gap"] = int(int(state["proj_gap"]) * group["gamma_proj"])

    def basis(self, state: dict, group: dict, grad: Tensor, side: Side) -> PackedBasis:
        m, n = grad.shape
        r = group["rank"]
        shape = (r, n) if side == Side.RIGHT else (m, r)
        return PackedBasis(state["proj_codes"], state["proj_scales"], state["proj_zeros"],
                           shape, group["quant_n_bit"], group["quant_group_size"], grad.dtype)

    def project(self, basis: PackedBasis, grad: Tensor, side: Side) -> Tensor:
        rank = basis.shape[0] if side == Side.RIGHT else basis.shape[1]
        return ops.int4_project(grad, basis.codes, basis.scales, basis.zeros, rank,
                                side == Side.RIGHT, basis.bits, basis.group_size)

    def project_back(self, basis: PackedBasis, low: Tensor, side: Side) -> Tensor:
        dense = basis.dense().to(low.dtype)
        return low @ dense if side == Side.RIGHT else dense @ low

    def update_weight_(self, basis: PackedBasis, low: Tensor, side: Side, weight: Tensor,
                       alpha: float, beta: float = 1.0) -> None:
        ops.int4_project_back_(weight, low, basis.codes, basis.scales, basis.zeros,
                               side == Side.RIGHT, basis.bits, basis.group_size, basis.dtype,
                               alpha, beta)


def _first_vector(basis: Tensor, side: Side) -> Tensor:
    return basis[0] if side == Side.RIGHT else basis[:, 0]


register_projector(QGaLoreProjector())
