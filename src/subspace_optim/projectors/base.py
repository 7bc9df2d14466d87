"""The Projector contract that every low-rank method implements.

A projector is a *stateless strategy*: one instance serves every parameter of every
optimizer, and everything it remembers about one parameter lives in that parameter's
``optimizer.state[p]`` as tensors or plain ints/floats, under keys that start with
``proj_``. That is what keeps checkpoints loadable with ``torch.load(weights_only=True)``.

The optimizer drives a projector through one step of a projected parameter like this
(``G`` is the gradient viewed as an ``m x n`` matrix, ``side`` comes from :func:`resolve_side`)::

    if first touch:
        projector.init_state(state, param_index, group)  # e.g. Flora's seed
    if projector.needs_refresh(state, step, group):
        old = projector.basis(state, side, G, group)          # only when moments are re-projected
        low = projector.refresh(state, G, side, group)  # may return project(G) for free
        ... moments kept, re-projected or reset, per projector.moment_policy(group)
    basis = projector.basis(state, side, G, group)             # transient, rebuilt each step
    low = projector.project(basis, G, side)             # unless refresh returned it
    N = inner_rule(low, moments)                        # AdamW, ...
    projector.add_back_(basis, N, side, W, alpha)       # W += alpha * project_back(N)
    projector.after_update(state, G, side, basis, group, refreshed)

``basis`` is whatever the method needs to apply its projection: a dense matrix for GaLore
(stored), DCT (gathered from a shared table), Flora (regenerated from a seed) or Q-GaLore
(dequantised), or indices and scales for Grass. ``after_update`` lets Online Subspace
Descent step its basis after the back-projection, as its reference code does.

Shapes: on the ``right`` side the projected gradient is ``m x r`` and a dense basis is
``r x n`` (``R = G B^T``, back ``N B``); on the ``left`` side it is ``r x n`` and a dense
basis is ``m x r`` (``R = B^T G``, back ``B N``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .._validate import check_number, check_positive_int

PROJ_TYPES = ("std", "reverse_std", "left", "right")

# What happens to the inner rule's moments when the subspace changes.
KEEP = "keep"  # GaLore, Q-GaLore, OSD: moments stay as they are (reference behaviour)
REPROJECT = "reproject"  # Flora, DCT rotation: m <- project_new(project_back_old(m))
RESET = "reset"  # Grass: moments start again from zero
MOMENT_POLICIES = (KEEP, REPROJECT, RESET)


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The matrix a parameter is projected as: ``(shape[0], prod(shape[1:]))``."""
    rest = 1
    for d in shape[1:]:
        rest *= d
    return int(shape[0]), rest


def resolve_side(shape: tuple[int, int], proj_type: str) -> str:
    """Which side of an ``m x n`` matrix is projected: ``"left"`` (rows) or ``"right"``.

    ``std`` projects the smaller dimension so that states are ``m x r`` for tall matrices
    and ``r x n`` for wide ones (GaLore's rule; ties go right, as in galore-torch).
    ``reverse_std`` projects the larger one; ``left`` and ``right`` force a side.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"Invalid proj_type: {proj_type!r} (expected one of {PROJ_TYPES})")


def index_dtype(size: int) -> torch.dtype:
    """Smallest signed integer dtype that holds indices below ``size`` (int16 up to 32767,
    which covers every hidden size in use; int32 beyond)."""
    return torch.int16 if size <= torch.iinfo(torch.int16).max else torch.int32


class Projector:
    """Base class of the projector strategies; see the module docstring for the protocol.

    Subclasses set ``name`` (the registry key used as the group key ``projector``) and
    ``group_defaults`` (the group keys they read, with their defaults), and implement
    ``needs_refresh``, ``refresh``, ``basis``, ``project``, ``project_back`` and ``add_back_``.
    """

    name: ClassVar[str]
    group_defaults: ClassVar[dict[str, Any]] = {
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
    }
    proj_types: ClassVar[tuple[str, ...]] = PROJ_TYPES
    # State keys that stay on the CPU whatever the parameter's device (e.g. a seed read
    # by the host); all other state tensors follow the parameter on load.
    host_state_keys: ClassVar[frozenset[str]] = frozenset()

    def validate_group(self, group: dict) -> None:
        """Raise ``ValueError`` naming any bad group value this projector reads."""
        check_positive_int(group, "update_proj_gap")
        check_number(group, "scale", 0, low_inclusive=False)
        if group["proj_type"] not in self.proj_types:
            raise ValueError(
                f"Invalid proj_type: {group['proj_type']!r} for projector {self.name!r} "
                f"(expected one of {self.proj_types})"
            )

    def moment_policy(self, group: dict) -> str:
        """What the optimizer does to its moments after a refresh: KEEP, REPROJECT or RESET."""
        return KEEP

    def init_state(self, state: dict, param_index: int, group: dict) -> None:
        """Called once per parameter before its first step. ``param_index`` is the 1-based
        position of the parameter in the optimizer's param groups (stable across runs of
        the same model), from which seeded methods derive a per-parameter seed."""

    def needs_refresh(self, state: dict, step: int, group: dict) -> bool:
        """Whether to compute a new subspace before projecting at ``step`` (0-based)."""
        raise NotImplementedError

    def refresh(self, state: dict, grad: Tensor, side: str, group: dict) -> Tensor | None:
        """Compute a new subspace from ``grad`` into ``state``.

        Must assign new tensors rather than write into old ones, so that a basis taken
        before the refresh stays valid for re-projecting moments. Returns
        ``project(basis, grad, side)`` when that came as a by-product, else ``None``.
        """
        raise NotImplementedError

    def basis(self, state: dict, side: str, grad: Tensor, group: dict) -> Any:
        """The transient operator ``project``/``project_back`` apply (see module docstring)."""
        raise NotImplementedError

    def project(self, basis: Any, grad: Tensor, side: str) -> Tensor:
        raise NotImplementedError

    def project_back(self, basis: Any, low: Tensor, side: str) -> Tensor:
        raise NotImplementedError

    def add_back_(self, basis: Any, low: Tensor, side: str, out: Tensor, alpha: float) -> None:
        """``out += alpha * project_back(low)`` without a full-size temporary where possible."""
        out.add_(self.project_back(basis, low, side).to(out.dtype), alpha=alpha)

    def reproject(self, old_basis: Any, new_basis: Any, moment: Tensor, side: str) -> Tensor:
        """Carry a moment from the old subspace into the new one."""
        return self.project(new_basis, self.project_back(old_basis, moment, side), side)

    def after_update(
        self, state: dict, grad: Tensor, side: str, basis: Any, group: dict, refreshed: bool
    ) -> None:
        """Called once the parameter has been updated (``refreshed``: a refresh happened
        this step); methods that learn their basis online (OSD) take their step here."""


class MatrixProjector(Projector):
    """A projector whose basis is a dense matrix: ``r x n`` on the right, ``m x r`` on the left."""

    def project(self, basis: Tensor, grad: Tensor, side: str) -> Tensor:
        return grad @ basis.T if side == "right" else basis.T @ grad

    def project_back(self, basis: Tensor, low: Tensor, side: str) -> Tensor:
        return low @ basis if side == "right" else basis @ low

    def reproject(self, old_basis: Tensor, new_basis: Tensor, moment: Tensor, side: str) -> Tensor:
        # Moments may be kept at a higher precision than the basis (state_bits=32 with bf16
        # weights): carry them at theirs.
        dtype = moment.dtype
        back = self.project_back(old_basis.to(dtype), moment, side)
        return self.project(new_basis.to(dtype), back, side)

    def add_back_(self, basis: Tensor, low: Tensor, side: str, out: Tensor, alpha: float) -> None:
        low = low.to(out.dtype)
        basis = basis.to(out.dtype)
        if side == "right":
            out.addmm_(low, basis, alpha=alpha)
        else:
            out.addmm_(basis, low, alpha=alpha)


_REGISTRY: dict[str, Projector] = {}


def register_projector(projector: Projector) -> Projector:
    """Make ``projector`` available under ``projector.name`` as the group key ``projector``."""
    if not isinstance(projector, Projector):
        raise TypeError(f"register_projector expects a Projector instance, got {projector!r}")
    _REGISTRY[projector.name] = projector
    return projector


def get_projector(name: str) -> Projector:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown projector: {name!r} (registered: {sorted(_REGISTRY)})"
        ) from None


def registered_projectors() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def registered_group_keys() -> frozenset[str]:
    """Every group key some registered projector reads (plus ``projector`` itself)."""
    keys = {"projector"}
    for projector in _REGISTRY.values():
        keys.update(projector.group_defaults)
    return frozenset(keys)
