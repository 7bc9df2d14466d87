"""Projectors: one file per method, each registered under its group-key name."""

from . import svd as _svd  # noqa: F401  (registers "galore")
from .base import (
    KEEP,
    MOMENT_POLICIES,
    PROJ_TYPES,
    REPROJECT,
    RESET,
    MatrixProjector,
    Projector,
    get_projector,
    matrix_shape,
    register_projector,
    registered_projectors,
    resolve_side,
)
from .svd import SVDProjector, top_singular_basis

__all__ = [
    "KEEP",
    "MOMENT_POLICIES",
    "PROJ_TYPES",
    "REPROJECT",
    "RESET",
    "MatrixProjector",
    "Projector",
    "SVDProjector",
    "get_projector",
    "matrix_shape",
    "register_projector",
    "registered_projectors",
    "resolve_side",
    "top_singular_basis",
]
