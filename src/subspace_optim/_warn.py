"""Warnings that a long training run should show once, not once per step."""

from __future__ import annotations

import warnings

_already_warned: set[str] = set()


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
    if key in _already_warned:
        return
    _already_warned.add(key)
    warnings.warn(message, category, stacklevel=3)


def reset_warnings() -> None:
    """Forget what was warned (tests use this to see a warning again)."""
    _already_warned.clear()
