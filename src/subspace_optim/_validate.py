"""Checks of user-supplied group values; each raises a ValueError that names the key and value.

Numbers must be real Python numbers (``bool`` is not one) and finite: an ``inf`` learning
rate or scale would make every weight non-finite at the first step, so it is refused here
rather than discovered there. Where torch accepts a one-element tensor (``lr``, ``betas``),
so do these checks, with torch's own messages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

# Seeds are stored as int64 tensors and advanced by adding a parameter's index, so they
# stay well below 2**63.
MAX_SEED = 2**62


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bound_text(low: float, high: float, low_inclusive: bool) -> str:
    text = f"{'>=' if low_inclusive else '>'} {low}"
    if high != math.inf:
        text += f" and <= {high}"
    return text


def check_number(group: dict, key: str, low: float = -math.inf, high: float = math.inf,
                 low_inclusive: bool = True, label: str | None = None) -> None:
    """A finite real number in the range; ``label`` replaces the key in the message (torch's
    wording: "learning rate", "epsilon value", "weight_decay value")."""
    value = group[key]
    name = label or key
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(
            f"Invalid {name}: {value!r} (must be a finite number "
            f"{_bound_text(low, high, low_inclusive)})"
        )
    above = value >= low if low_inclusive else value > low
    if not (above and value <= high):
        raise ValueError(
            f"Invalid {name}: {value!r} (must be {_bound_text(low, high, low_inclusive)})"
        )


def scalar_value(value: Any, what: str) -> Any:
    """The Python number inside a one-element tensor (torch's rule for tensor hyperparameters);
    other values pass through unchanged."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {what} must be 1-element")
        return value.item()
    return value


def check_lr(group: dict, key: str = "lr") -> None:
    value = scalar_value(group[key], key)
    check_number({key: value}, key, 0.0, label="learning rate")


def check_positive_int(group: dict, key: str) -> None:
    if not is_int(group[key]) or group[key] < 1:
        raise ValueError(f"Invalid {key}: {group[key]!r} (must be an integer >= 1)")


def check_seed(group: dict) -> None:
    seed = group["seed"]
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"Invalid seed: {seed!r} (must be an integer in [0, 2**62])")


def check_choice(group: dict, key: str, choices: Sequence[Any]) -> None:
    """One of ``choices``, of the same type (``8.0`` is not the integer 8, ``True`` not 1)."""
    value = group[key]
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"Invalid {key}: {value!r} (expected one of {tuple(choices)})")


def check_bool(group: dict, key: str) -> None:
    if not isinstance(group[key], bool):
        raise ValueError(f"Invalid {key}: {group[key]!r} (must be True or False)")


def check_betas(group: dict) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair of floats)")
    tensors = [isinstance(b, Tensor) for b in betas]
    if any(tensors) and not all(tensors):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        value = scalar_value(beta, f"betas[{i}]")
        if not is_number(value) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {i}: {value!r} (must be a number in [0, 1))"
            )
