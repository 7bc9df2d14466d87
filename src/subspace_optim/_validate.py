"""Checks of user-supplied group values; each raises a ValueError that names the value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(group: dict, key: str) -> None:
    if not is_int(group[key]) or group[key] < 1:
        raise ValueError(f"Invalid {key}: {group[key]!r} (must be an integer >= 1)")


def check_seed(group: dict) -> None:
    if not is_int(group["seed"]) or group["seed"] < 0:
        raise ValueError(f"Invalid seed: {group['seed']!r} (must be an integer >= 0)")


def check_choice(group: dict, key: str, choices: Sequence[Any]) -> None:
    if group[key] not in choices:
        raise ValueError(f"Invalid {key}: {group[key]!r} (expected one of {tuple(choices)})")


def check_bool(group: dict, key: str) -> None:
    if not isinstance(group[key], bool):
        raise ValueError(f"Invalid {key}: {group[key]!r} (must be a bool)")


def check_number(group: dict, key: str, low: float, high: float = float("inf"),
                 low_inclusive: bool = True) -> None:
    value = group[key]
    above = value >= low if low_inclusive else value > low
    if not is_number(value) or not (above and value <= high):
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (
            f" and <= {high}" if high != float("inf") else ""
        )
        raise ValueError(f"Invalid {key}: {value!r} (must be a number {bound})")


def check_betas(group: dict) -> None:
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair of floats)")
    for i, beta in enumerate(betas):
        if not is_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")
