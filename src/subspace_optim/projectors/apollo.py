"""APOLLO's random projection (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level
Performance", MLSys 2025, arXiv 2412.05270; reference package ``apollo-torch``).

A Gaussian basis with variance ``1/r``, regenerated from a per-parameter seed as Flora's
(``projectors.flora``: the seed starts at ``seed + index`` and advances by Flora's rule every
``update_proj_gap`` steps, which is apollo-torch's rule too), but the moments are kept as
they are across a resample, as apollo-torch keeps them: they only estimate the scale of the
update (``optim.apollo``), not its direction.

``generator``: ``"counter"`` (default) draws the matrix from the library's counter-based
hash, so that the Triton kernels generate it tile by tile; ``"torch"`` draws it as
apollo-torch does (``torch.randn`` from a ``torch.Generator`` seeded with the seed, on the
gradient's device), the same numbers as the reference package.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._validate import check_choice
from .base import KEEP, Side, register_projector
from .flora import FloraProjector

GENERATORS = ("counter", "torch")


def torch_gaussian_basis(seed: int, shape: tuple[int, int], rank: int, side: Side,
                         device: torch.device, dtype: torch.dtype) -> Tensor:
    """apollo-torch's matrix: ``randn`` of a generator seeded with ``seed``, over
    ``sqrt(rank)``; ``m x r`` on the left, ``r x n`` on the right."""
    m, n = shape
    size = (rank, n) if side == Side.RIGHT else (m, rank)
    generator = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(size, generator=generator, device=device, dtype=torch.float32)
    return (basis / math.sqrt(rank)).to(dtype)


class ApolloProjector(FloraProjector):
    """Seeded Gaussian projection for APOLLO's scaling; state ``proj_seed``."""

    name = "apollo"
    defaults = {"update_proj_gap": 200, "scale": 1.0, "seed": 0, "generator": "counter"}

    def validate_group(self, group: dict) -> None:
        super().validate_group(group)
        check_choice(group, "generator", GENERATORS)

    def moment_policy(self, group: dict) -> str:
        return KEEP

    def basis(self, state: dict, group: dict, grad: Tensor, side: Side):
        if group["generator"] == "torch":
            return torch_gaussian_basis(int(state["proj_seed"]), tuple(grad.shape),
                                        group["rank"], side, grad.device, grad.dtype)
        return super().basis(state, group, grad, side)


register_projector(ApolloProjector())
