"""Inner update rules as pure functions on tensors (no parameters, no optimizer objects)."""

from .adamw import CONVENTIONS, adamw_update

__all__ = ["CONVENTIONS", "adamw_update"]
