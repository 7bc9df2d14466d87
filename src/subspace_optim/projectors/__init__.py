"""Projectors: one file per method, each registered under its group-key name."""

# Importing each module registers its projector under its group-key name.
from ..ops.flora import flora_basis
from . import apollo, dct, flora, grass, online_pca, q_galore, svd  # noqa: F401
from .apollo import ApolloProjector
from .base import (
    KEEP,
    MOMENT_POLICIES,
    PROJ_TYPES,
    REPROJECT,
    RESET,
    MatrixProjector,
    Projector,
    Side,
    get_projector,
    matrix_shape,
    projected_shape,
    register_projector,
    registered_projectors,
    resolve_side,
)
from .dct import DCTProjector, dct2_makhoul, dct_basis
from .flora import FloraProjector
from .grass import GrassProjector
from .online_pca import OnlinePCAProjector
from .q_galore import QGaLoreProjector
from .svd import SVDProjector, top_singular_basis

__all__ = [
    "ApolloProjector",
    "DCTProjector",
    "FloraProjector",
    "GrassProjector",
    "OnlinePCAProjector",
    "QGaLoreProjector",
    "dct2_makhoul",
    "dct_basis",
    "flora_basis",
    "KEEP",
    "MOMENT_POLICIES",
    "PROJ_TYPES",
    "REPROJECT",
    "RESET",
    "MatrixProjector",
    "Projector",
    "Side",
    "projected_shape",
    "SVDProjector",
    "get_projector",
    "matrix_shape",
    "register_projector",
    "registered_projectors",
    "resolve_side",
    "top_singular_basis",
]
