"""Optimizer classes: plumbing around the pure rules in ``subspace_optim.rules``."""

from .adamw import GaLoreAdamW, SubspaceAdamW
from .base import SubspaceOptimizer
from .flora_adafactor import FloraAdafactor
from .methods import DCTAdamW, FloraAdamW, GrassAdamW, OnlineSubspaceAdamW, QGaLoreAdamW

__all__ = [
    "DCTAdamW",
    "FloraAdafactor",
    "FloraAdamW",
    "GaLoreAdamW",
    "GrassAdamW",
    "OnlineSubspaceAdamW",
    "QGaLoreAdamW",
    "SubspaceAdamW",
    "SubspaceOptimizer",
]
