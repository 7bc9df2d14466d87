"""Drop-ins with 8-bit block-wise optimizer states (``state_bits=8``, through bitsandbytes).

Unlike galore-torch's ``GaLoreAdamW8bit`` (and Q-GaLore's), nothing swaps ``p.data`` or clones
the weight: the 8-bit moments are dequantised, updated in float32 and quantised back, and
the back-projected update is added into the weight in place. It runs on the CPU too.
"""

from __future__ import annotations

from collections.abc import Iterable

from .adamw import SubspaceAdamW


class GaLoreAdamW8bit(SubspaceAdamW):
    """GaLore with 8-bit AdamW states; defaults of ``galore_torch.GaLoreAdamW8bit`` (that is,
    bitsandbytes' AdamW8bit: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2,
    moments under 4096 elements kept in float32)."""

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_bits: int | None = 8, **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, state_bits=state_bits, **kwargs)


class QGaLoreAdamW8bit(GaLoreAdamW8bit):
    """Q-GaLore as its training scripts run it: INT4 projector with lazy refresh (projector
    ``q_galore``), 8-bit AdamW states and beta2 = 0.95 (the scripts' ``--beta2`` default).
    Combine with :func:`subspace_optim.nn.quantize_linear_layers` for INT8 weights."""

    default_projector = "q_galore"

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)
