"""What a param group may hold: the keys the optimizer reads, near misses of them, and
projection keys in a group that is not projected.

torch's convention is to accept unknown group keys (users keep e.g. ``name`` in a group and
LR schedulers add ``initial_lr``), and that stays so. But a key that is one typo away from a
key the optimizer reads (``update_proj_gpa``, ``rnak``) is almost certainly a mistake that
would otherwise train with a silent default, so it is an error that names both keys.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable

from .._validate import check_bool, check_choice, check_number, check_positive_int, is_int
from ..projectors.base import get_projector, matrix_shape, registered_group_keys
from . import moments

# Keys torch itself puts into groups: named parameters, and the LR/momentum schedulers.
TORCH_GROUP_KEYS = frozenset({
    "params", "param_names", "initial_lr", "max_lr", "min_lr", "base_momentum",
    "max_momentum", "momentum", "swa_lr",
})
# Keys of this library that every optimizer class reads.
LIBRARY_GROUP_KEYS = frozenset({"rank", "projector", "state_bits", "skip_nonfinite",
                                "foreach", "fused", "maximize", "capturable", "differentiable",
                                "min_8bit_size"})
# A ratio of difflib's SequenceMatcher at or above this is a near miss; 0.8 catches one
# wrong or swapped letter in keys of 5+ letters while leaving e.g. "lr_scale" (0.77 from
# "scale") alone.
NEAR_MISS_RATIO = 0.8


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of
    neighbours each cost one (so "rnak" is one edit from "rank")."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def near_miss(key: str, known: Iterable[str]) -> str | None:
    """The known key that ``key`` is most likely a misspelling of, or ``None``."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=NEAR_MISS_RATIO)
    if close:
        return close[0]
    if len(key) >= 4:  # short keys are one edit from too many others to guess
        for candidate in known:
            if abs(len(candidate) - len(key)) <= 1 and _edit_distance(key, candidate) == 1:
                return candidate
    return None


def check_group_keys(group: dict, rule_keys: Iterable[str], owner: str,
                     given: Iterable[str] | None = None) -> None:
    """Refuse near misses of known keys; warn about projection keys the user put in a group
    without ``rank`` (``given``: the keys the user wrote, before defaults were filled in)."""
    projection = registered_group_keys()
    known = set(rule_keys) | LIBRARY_GROUP_KEYS | TORCH_GROUP_KEYS | projection
    for key in group:
        if not isinstance(key, str) or key in known:
            continue
        match = near_miss(key, known)
        if match is not None:
            if match == "rank":
                consequence = "without 'rank' the group would not be projected at all"
            elif match in rule_keys or match in LIBRARY_GROUP_KEYS or match in projection:
                consequence = f"it would ignore {key!r} and use the default of {match!r}"
            else:
                consequence = f"it would ignore {key!r}"
            raise ValueError(
                f"Unknown param group key {key!r}: did you mean {match!r}? {owner}: "
                f"{consequence}"
            )
    if "rank" in group or given is None:
        return
    stray = sorted(k for k in given if k in projection)
    if stray:
        warnings.warn(
            f"{owner}: param group keys {stray} configure a projection, but the group has no "
            "'rank', so it is updated at full rank and they are ignored. Add 'rank' to "
            "project it.",
            UserWarning,
            stacklevel=5,
        )


def validate_common(group: dict) -> None:
    """The values every class reads: lr, weight decay, state precision, skip_nonfinite and
    the implementation flags."""
    group.setdefault("state_bits", None)
    group.setdefault("skip_nonfinite", False)
    check_choice(group, "state_bits", moments.STATE_BITS)
    if "min_8bit_size" in group:
        check_positive_int(group, "min_8bit_size")
    check_bool(group, "skip_nonfinite")
    check_number(group, "weight_decay", 0.0, label="weight_decay value")
    for flag in ("foreach", "fused"):
        if group.get(flag) is not None:
            check_bool(group, flag)
    if group.get("foreach") and group.get("fused"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if "maximize" in group:
        check_bool(group, "maximize")


def prepare_projected_group(group: dict, default_projector: str, rank_must_fit: bool) -> None:
    """Fill in the projector's defaults and check the projection's values (``rank``
    against every matrix of the group)."""
    group.setdefault("projector", default_projector)
    projector = get_projector(group["projector"])
    for key, value in projector.group_defaults.items():
        group.setdefault(key, value)
    rank = group["rank"]
    if not is_int(rank) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r} (must be an integer >= 1)")
    projector.validate_group(group)
    if not rank_must_fit:
        return
    full = []
    for p in group["params"]:
        if p.dim() < 2 or p.numel() == 0:  # vectors and empty tensors are not projected
            continue
        m, n = matrix_shape(p.shape)
        if rank > min(m, n):
            raise ValueError(
                f"Invalid rank: {rank} is larger than the smaller dimension of a parameter "
                f"of shape {tuple(p.shape)} (projected as a {m}x{n} matrix); use rank <= "
                f"{min(m, n)} or move this parameter to a group without 'rank'"
            )
        if rank == min(m, n):
            full.append(tuple(p.shape))
    if full:
        warnings.warn(
            f"rank {rank} is not below the smaller dimension of {len(full)} parameter(s) "
            f"(shapes {full[:3]}{' ...' if len(full) > 3 else ''}): projected, each keeps "
            "more optimizer state than AdamW (moments of its full size plus a basis) for the "
            "same update; move them to a group without 'rank' (subspace_optim.param_groups "
            "does)", UserWarning, stacklevel=6)
