"""subspace_optim: memory-efficient low-rank optimizers for PyTorch.

Swap ``torch.optim.AdamW`` for :class:`SubspaceAdamW` (or ``galore_torch.GaLoreAdamW`` for
:class:`GaLoreAdamW`) and switch projection on per param group with the key ``rank``.
"""

from .layerwise import BackwardStepper, step_in_backward
from .memory import optimizer_state_bytes
from .named_groups import param_groups
from .optim import (
    DCTAdamW,
    FloraAdafactor,
    FloraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GrassAdamW,
    OnlineSubspaceAdamW,
    QGaLoreAdamW,
    QGaLoreAdamW8bit,
    SubspaceAdafactor,
    SubspaceAdamW,
    SubspaceLion,
    SubspaceOptimizer,
)
from .projectors import Projector, get_projector, register_projector, registered_projectors

__version__ = "0.1.0"

__all__ = [
    "BackwardStepper",
    "DCTAdamW",
    "FloraAdafactor",
    "FloraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GrassAdamW",
    "OnlineSubspaceAdamW",
    "Projector",
    "QGaLoreAdamW",
    "QGaLoreAdamW8bit",
    "SubspaceAdafactor",
    "SubspaceAdamW",
    "SubspaceLion",
    "SubspaceOptimizer",
    "get_projector",
    "optimizer_state_bytes",
    "param_groups",
    "register_projector",
    "registered_projectors",
    "step_in_backward",
]
