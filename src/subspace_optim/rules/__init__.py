"""Inner update rules as pure functions on tensors (no parameters, no optimizer objects)."""

from . import adafactor
from .adafactor import adafactor_update
from .adamw import CONVENTIONS, adamw_update
from .lion import lion_update

__all__ = ["CONVENTIONS", "adafactor", "adafactor_update", "adamw_update", "lion_update"]
