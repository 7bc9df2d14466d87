"""Inner update rules as pure functions on tensors (no parameters, no optimizer objects)."""

from . import adafactor
from .adamw import CONVENTIONS, adamw_update

__all__ = ["CONVENTIONS", "adafactor", "adamw_update"]
