"""Drop-ins with 8-bit block-wise optimizer states (``state_bits=8``, through bitsandbytes).

Unlike galore-torch's ``GaLoreAdamW8bit`` (and Q-GaLore's), nothing swaps ``p.data`` or clones
the weight: the 8-bit moments are dequantised, updated in float32 and quantised back, and
the back-projected update is added into the weight in place. It runs on the CPU too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .adamw import SubspaceAdamW
from .moments import MIN_8BIT_SIZE

# bitsandbytes' AdamW8bit keywords: those that mean something here and the value each
# takes here, and those refused (with why).
_BNB_REFUSED = {
    "amsgrad": (False, "AMSGrad is not implemented"),
    "percentile_clipping": (100, "percentile clipping is not implemented (100 turns it off)"),
    "block_wise": (True, "the 8-bit states here are always block-wise (blocks of 256)"),
    "is_paged": (False, "paged states are a bitsandbytes CUDA feature; states here are "
                        "ordinary tensors"),
    "args": (None, "bitsandbytes' argument object has no meaning here"),
}


def _bnb_keywords(keywords: dict[str, Any], state_bits: int | None) -> int | None:
    """Honour or refuse bitsandbytes' AdamW8bit keywords (``optim_bits`` 8 or 32 picks the
    state precision; the refused ones are a ``ValueError`` naming the keyword, unless given
    their harmless value). Returns the state precision."""
    for key, (harmless, why) in _BNB_REFUSED.items():
        if key in keywords:
            value = keywords.pop(key)
            if value != harmless:
                raise ValueError(f"{key}={value!r} is not supported: {why} (only "
                                 f"{key}={harmless!r} is accepted, for bitsandbytes' call "
                                 "sites)")
    if "optim_bits" in keywords:
        bits = keywords.pop("optim_bits")
        if bits not in (8, 32):
            raise ValueError(f"optim_bits={bits!r} is not supported (8 or 32)")
        state_bits = bits
    return state_bits


class GaLoreAdamW8bit(SubspaceAdamW):
    """GaLore with 8-bit AdamW states; defaults of ``galore_torch.GaLoreAdamW8bit`` (that is,
    bitsandbytes' AdamW8bit: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2,
    moments under ``min_8bit_size`` = 4096 elements kept in float32).

    bitsandbytes' keywords are taken where they mean something here: ``optim_bits`` (8, or
    32 for float32 states), ``min_8bit_size``, and ``block_wise=True``,
    ``percentile_clipping=100``, ``amsgrad=False``, ``is_paged=False`` (their defaults); any
    other value of those is a ``ValueError`` naming it."""

    optional_group_keys = SubspaceAdamW.optional_group_keys | {"min_8bit_size"}

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_bits: int | None = 8,
                 min_8bit_size: int = MIN_8BIT_SIZE, **kwargs) -> None:
        state_bits = _bnb_keywords(kwargs, state_bits)
        self._min_8bit_size = min_8bit_size
        super().__init__(params, lr, betas, eps, weight_decay, state_bits=state_bits, **kwargs)

    def _validate_rule_group(self, group: dict) -> None:
        group.setdefault("min_8bit_size", getattr(self, "_min_8bit_size", MIN_8BIT_SIZE))
        super()._validate_rule_group(group)


class QGaLoreAdamW8bit(GaLoreAdamW8bit):
    """Q-GaLore as its training scripts run it: INT4 projector with lazy refresh (projector
    ``q_galore``), 8-bit AdamW states and beta2 = 0.95 (the scripts' ``--beta2`` default).
    Combine with :func:`subspace_optim.nn.quantize_linear_layers` for INT8 weights."""

    default_projector = "q_galore"

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)
