"""The Projector contract that every low-rank method implements.

A projector is a *stateless strategy*: one instance serves every parameter of every
optimizer, and everything it remembers about one parameter lives in that parameter's
``optimizer.state[p]`` as tensors or plain ints/floats, under keys that start with
``proj_``. That is what keeps checkpoints loadable with ``torch.load(weights_only=True)``.

Every hook that reads or writes the state takes ``(state, group, grad, side, ...)`` in that
order; every hook that applies a basis takes ``(basis, tensor, side, ...)``. The optimizer
drives one step of a projected parameter like this (``G`` is the gradient viewed as an
``m x n`` matrix, ``side`` comes from :func:`resolve_side`)::

    if first touch:
        projector.init_state(state, group, param_index)      # e.g. Flora's seed
    if projector.needs_refresh(state, group, step):
        old = projector.basis(state, group, G, side)         # only when moments move
        low = projector.refresh(state, group, G, side)       # may return project(G) for free
        ... moments kept, re-projected or reset, per projector.moment_policy(group)
    basis = projector.basis(state, group, G, side)           # transient, rebuilt each step
    low = projector.project(basis, G, side)                  # unless refresh returned it
    N = inner_rule(low, moments)                             # AdamW, ...
    projector.update_weight_(basis, N, side, W, alpha, beta) # W <- beta W + alpha back(N)
    projector.after_update(state, group, G, side, basis, refreshed)

``basis`` is whatever the method needs to apply its projection: a dense matrix for GaLore
(stored), DCT (gathered from a shared table), Flora (regenerated from a seed) or Q-GaLore
(dequantised), or indices and scales for Grass. ``after_update`` lets Online Subspace
Descent step its basis after the back-projection, as its reference code does.

Shapes: on the ``right`` side the projected gradient is ``m x r`` and a dense basis is
``r x n`` (``R = G B^T``, back ``N B``); on the ``left`` side it is ``r x n`` and a dense
basis is ``m x r`` (``R = B^T G``, back ``B N``).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._validate import check_number, check_positive_int


class Side(str, Enum):
    """Which dimension of an ``m x n`` matrix a projection reduces. A ``str`` enum, so that
    ``side == "left"`` also holds for the plain strings older code passes."""

    LEFT = "left"
    RIGHT = "right"

    def __str__(self) -> str:
        return self.value


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


def resolve_side(shape: tuple[int, int], proj_type: str) -> Side:
    """Which side of an ``m x n`` matrix is projected.

    ``std`` projects the smaller dimension so that states are ``m x r`` for tall matrices
    and ``r x n`` for wide ones (GaLore's rule; ties go right, as in galore-torch).
    ``reverse_std`` projects the larger one; ``left`` and ``right`` force a side.
    """
    m, n = shape
    if proj_type == "std":
        return Side.RIGHT if m >= n else Side.LEFT
    if proj_type == "reverse_std":
        return Side.LEFT if m >= n else Side.RIGHT
    if proj_type in ("left", "right"):
        return Side(proj_type)
    raise ValueError(f"Invalid proj_type: {proj_type!r} (expected one of {PROJ_TYPES})")


def projected_shape(shape: tuple[int, int], rank: int, side: Side) -> tuple[int, int]:
    """Shape of the projected gradient (and of the rule's moments) of an ``m x n`` matrix."""
    m, n = shape
    return (m, rank) if side == Side.RIGHT else (rank, n)


def working_dtype(t: Tensor) -> torch.dtype:
    """The dtype a projector computes in for ``t``: float64 stays float64 (a float64 run is
    a numerical check, which a float32 SVD would blur), every other floating dtype works in
    float32 (there is no bf16 SVD, and fp16 sums overflow)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def index_dtype(size: int) -> torch.dtype:
    """Smallest signed integer dtype that holds indices below ``size`` (int16 up to 32767,
    which covers every hidden size in use; int32 beyond)."""
    return torch.int16 if size <= torch.iinfo(torch.int16).max else torch.int32


class Projector:
    """Base class of the projector strategies; see the module docstring for the protocol.

    Subclasses set ``name`` (the registry key used as the group key ``projector``) and
    ``defaults`` (the group keys they add or whose defaults they change: ``group_defaults``
    is the parent's updated with them), and implement ``refresh``, ``basis``, ``project``,
    ``project_back`` and ``update_weight_``.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {
        "update_proj_gap": 200,
        "scale": 0.25,
        "proj_type": "std",
    }
    group_defaults: ClassVar[dict[str, Any]] = dict(defaults)
    proj_types: ClassVar[tuple[str, ...]] = PROJ_TYPES
    # State keys that stay on the CPU whatever the parameter's device (e.g. a seed read
    # by the host); all other state tensors follow the parameter on load.
    host_state_keys: ClassVar[frozenset[str]] = frozenset()
    # Group keys besides rank, projector, proj_type and state_bits that shape the state
    # (a change re-creates it), and the state keys kept in the parameter's dtype (cast
    # with it when a state dict is loaded into a model of another precision).
    state_layout_keys: ClassVar[frozenset[str]] = frozenset()
    param_dtype_state_keys: ClassVar[frozenset[str]] = frozenset()
    # The state key whose absence means the subspace was never computed (None: the method
    # needs no first refresh), and whether it is refreshed every ``update_proj_gap`` steps.
    basis_key: ClassVar[str | None] = None
    periodic: ClassVar[bool] = True
    # Whether a refresh costs enough (an SVD, a scoring of every column) that with several
    # ranks one owner per matrix computes it and broadcasts the result
    # (``distributed.refresh``); cheap ones (a new seed, row norms) run on every rank.
    refresh_on_owner: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("defaults")
        if own is not None:
            parent = next(b for b in cls.__mro__[1:] if hasattr(b, "group_defaults"))
            cls.group_defaults = {**parent.group_defaults, **own}

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

    def init_state(self, state: dict, group: dict, param_index: int) -> None:
        """Called once per parameter before its first step. ``param_index`` is the 1-based
        position of the parameter in the optimizer's param groups (stable across runs of
        the same model), from which seeded methods derive a per-parameter seed."""

    def needs_refresh(self, state: dict, group: dict, step: int) -> bool:
        """Whether to compute a new subspace before projecting at ``step`` (0-based): when
        none was ever computed, and every ``update_proj_gap`` steps after that."""
        if self.basis_key is not None and self.basis_key not in state:
            return True
        return self.periodic and step > 0 and step % group["update_proj_gap"] == 0

    def refresh(self, state: dict, group: dict, grad: Tensor, side: Side) -> Tensor | None:
        """Compute a new subspace from ``grad`` into ``state``.

        Must assign new tensors rather than write into old ones, so that a basis taken
        before the refresh stays valid for re-projecting moments. Returns
        ``project(basis, grad, side)`` when that came as a by-product, else ``None``.
        """
        raise NotImplementedError

    def basis(self, state: dict, group: dict, grad: Tensor, side: Side) -> Any:
        """The transient operator ``project``/``project_back`` apply (see module docstring);
        ``grad`` gives the matrix's shape, dtype and device."""
        raise NotImplementedError

    def project(self, basis: Any, grad: Tensor, side: Side) -> Tensor:
        raise NotImplementedError

    def project_back(self, basis: Any, low: Tensor, side: Side) -> Tensor:
        """``low`` back in the full matrix's shape, computed and returned in ``low``'s dtype
        (a basis kept in the weight's bf16 is cast up to float32 moments, not the reverse)."""
        raise NotImplementedError

    def update_weight_(self, basis: Any, low: Tensor, side: Side, weight: Tensor,
                       alpha: float, beta: float = 1.0) -> None:
        """``weight <- beta * weight + alpha * project_back(low)``, in place and without a
        full-size temporary where the method allows (``beta`` folds in weight decay)."""
        if beta != 1.0:
            weight.mul_(beta)
        weight.add_(self.project_back(basis, low, side).to(weight.dtype), alpha=alpha)

    def reproject(self, old_basis: Any, new_basis: Any, moment: Tensor, side: Side) -> Tensor:
        """Carry a moment from the old subspace into the new one."""
        return self.project(new_basis, self.project_back(old_basis, moment, side), side)

    def after_update(self, state: dict, group: dict, grad: Tensor, side: Side, basis: Any,
                     refreshed: bool) -> None:
        """Called once the parameter has been updated (``refreshed``: a refresh happened
        this step); methods that learn their basis online (OSD) take their step here."""


class MatrixProjector(Projector):
    """A projector whose basis is a dense matrix: ``r x n`` on the right, ``m x r`` on the left."""

    def project(self, basis: Tensor, grad: Tensor, side: Side) -> Tensor:
        return grad @ basis.T if side == Side.RIGHT else basis.T @ grad

    def project_back(self, basis: Tensor, low: Tensor, side: Side) -> Tensor:
        # In low's precision, as every projector's: moments may be kept at a higher one than
        # the basis, which has the weight's (state_bits=32 with bf16 weights).
        if basis.dtype != low.dtype:
            basis = basis.to(low.dtype)
        return low @ basis if side == Side.RIGHT else basis @ low

    def reproject(self, old_basis: Tensor, new_basis: Tensor, moment: Tensor, side: Side) -> Tensor:
        back = self.project_back(old_basis, moment, side)  # at the moment's precision
        return self.project(new_basis.to(moment.dtype), back, side)

    def update_weight_(self, basis: Tensor, low: Tensor, side: Side, weight: Tensor,
                       alpha: float, beta: float = 1.0) -> None:
        # One GEMM that reads and writes the weight once: beta folds in weight decay.
        if low.dtype != weight.dtype:
            low = low.to(weight.dtype)
        if basis.dtype != weight.dtype:
            basis = basis.to(weight.dtype)
        if side == Side.RIGHT:
            weight.addmm_(low, basis, beta=beta, alpha=alpha)
        else:
            weight.addmm_(basis, low, beta=beta, alpha=alpha)


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
