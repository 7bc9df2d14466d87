"""Optimizer classes: plumbing around the pure rules in ``subspace_optim.rules``."""

from .adafactor import GaLoreAdafactor, SubspaceAdafactor
from .adamw import GaLoreAdamW, SubspaceAdamW
from .apollo import ApolloAdamW, ApolloMiniAdamW, FiraAdamW
from .base import SubspaceOptimizer
from .eightbit import GaLoreAdamW8bit, QGaLoreAdamW8bit
from .flora_adafactor import FloraAdafactor
from .lion import SubspaceLion
from .methods import DCTAdamW, FloraAdamW, GrassAdamW, OnlineSubspaceAdamW, QGaLoreAdamW

__all__ = [
    "ApolloAdamW",
    "ApolloMiniAdamW",
    "DCTAdamW",
    "FiraAdamW",
    "FloraAdafactor",
    "FloraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "GrassAdamW",
    "OnlineSubspaceAdamW",
    "QGaLoreAdamW",
    "QGaLoreAdamW8bit",
    "SubspaceAdafactor",
    "SubspaceAdamW",
    "SubspaceLion",
    "SubspaceOptimizer",
]
