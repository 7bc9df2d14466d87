"""Q-GaLore's projector: GaLore's SVD basis stored in INT4, refreshed lazily per layer
(Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
Low-Rank Gradients", arXiv 2407.08296; reference code VITA-Group/Q-GaLore).

Storage: the basis is quantised group-wise (``quant_group_size`` = 256 consecutive
elements, asymmetric min-max, zero inside the range) to ``quant_n_bit`` = 4 bits packed
two per byte (``subspace_optim.quant``), and dequantised once per step on use.

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

State: ``proj_codes`` (uint8), ``proj_scales`` (float32), ``proj_zeros`` (uint8), and on
the host ``proj_gap`` (int64), ``proj_queue`` (float32, ``queue_size``) and
``proj_queue_len`` (int64). Only ``proj_type="std"`` is supported, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import check_bool, check_choice, check_number, check_positive_int
from ..quant import dequantize_groupwise, quantize_groupwise
from .base import MatrixProjector, register_projector
from .svd import refreshed_basis


class QGaLoreProjector(MatrixProjector):
    """INT4 SVD basis with layer-adaptive lazy refresh."""

    name = "q_galore"
    proj_types = ("std",)
    group_defaults = {
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
        "quant_n_bit": 4,
        "quant_group_size": 256,
        "cos_threshold": 0.4,
        "gamma_proj": 2,
        "queue_size": 5,
        "cos_abs": False,
    }
    host_state_keys = frozenset({"proj_gap", "proj_queue", "proj_queue_len"})

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_choice(group, "quant_n_bit", (4, 8))
        check_positive_int(group, "quant_group_size")
        check_positive_int(group, "queue_size")
        check_number(group, "cos_threshold", -1, 1)
        check_number(group, "gamma_proj", 1)
        check_bool(group, "cos_abs")

    def needs_refresh(self, state: dict, step: int, group: dict) -> bool:
        return "proj_codes" not in state or step % int(state["proj_gap"]) == 0

    def refresh(self, state: dict, grad: Tensor, side: str, group: dict) -> None:
        new = refreshed_basis(state, grad, group["rank"], side)
        if new is None:
            return None
        new = new.to(grad.dtype)
        if "proj_codes" in state:
            old = self.basis(state, side, grad, group)
            self._observe(state, _first_vector(old, side), _first_vector(new, side), group)
        else:
            state["proj_gap"] = torch.tensor(group["update_proj_gap"], dtype=torch.int64)
            state["proj_queue"] = torch.zeros(group["queue_size"], dtype=torch.float32)
            state["proj_queue_len"] = torch.tensor(0, dtype=torch.int64)
        codes, scales, zeros = quantize_groupwise(
            new, group["quant_n_bit"], group["quant_group_size"]
        )
        state["proj_codes"], state["proj_scales"], state["proj_zeros"] = codes, scales, zeros
        return None

    @staticmethod
    def _observe(state: dict, old: Tensor, new: Tensor, group: dict) -> None:
        cos = F.cosine_similarity(old.float(), new.float(), dim=0)
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
        state["proj_queue_len"] = torch.tensor(length, dtype=torch.int64)
        if length == size and float(queue.mean()) >= group["cos_threshold"]:
            gap = int(int(state["proj_gap"]) * group["gamma_proj"])
            state["proj_gap"] = torch.tensor(gap, dtype=torch.int64)

    def basis(self, state: dict, side: str, grad: Tensor, group: dict) -> Tensor:
        m, n = grad.shape
        r = group["rank"]
        shape = (r, n) if side == "right" else (m, r)
        flat = dequantize_groupwise(
            state["proj_codes"], state["proj_scales"], state["proj_zeros"],
            shape[0] * shape[1], group["quant_n_bit"], group["quant_group_size"],
        )
        return flat.view(shape).to(grad.dtype)


def _first_vector(basis: Tensor, side: str) -> Tensor:
    return basis[0] if side == "right" else basis[:, 0]


register_projector(QGaLoreProjector())
