"""Optimizer classes: plumbing around the pure rules in ``subspace_optim.rules``."""

from .adamw import GaLoreAdamW, SubspaceAdamW
from .base import SubspaceOptimizer

__all__ = ["GaLoreAdamW", "SubspaceAdamW", "SubspaceOptimizer"]
