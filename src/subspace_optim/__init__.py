"""subspace_optim: memory-efficient low-rank optimizers for PyTorch.

Swap ``torch.optim.AdamW`` for :class:`SubspaceAdamW` (or ``galore_torch.GaLoreAdamW`` for
:class:`GaLoreAdamW`) and switch projection on per param group with the key ``rank``.
"""

from . import distributed  # noqa: F401 (registers the adapter of sharded parameters)
from .build import build, for_trainer
from .grads import clip_grad_norm_, grad_norm, unscale_
from .layerwise import BackwardStepper, step_in_backward
from .memory import optimizer_state_bytes
from .named_groups import param_groups
from .optim import (
    ApolloAdamW,
    ApolloMiniAdamW,
    DCTAdamW,
    FiraAdamW,
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
from .report import state_report

__version__ = "0.1.0"

__all__ = [
    "ApolloAdamW",
    "ApolloMiniAdamW",
    "BackwardStepper",
    "FiraAdamW",
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
    "build",
    "clip_grad_norm_",
    "for_trainer",
    "get_projector",
    "grad_norm",
    "optimizer_state_bytes",
    "param_groups",
    "register_projector",
    "registered_projectors",
    "state_report",
    "step_in_backward",
    "unscale_",
]
