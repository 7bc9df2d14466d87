"""Optional dependencies of the training command, with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingDependency(ImportError):
    pass


def require(module: str, extra: str = "train") -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(
            f"{module} is needed for this and is not installed: {install_hint(extra)}"
        ) from None


def install_hint(extra: str) -> str:
    """How to install an extra: from the project's checkout (the package is not on PyPI)."""
    return f'pip install ".[{extra}]" (in the repository\'s checkout)'
