"""The op seam: the kernel-shaped operations of a step, declared once, with a pure-PyTorch
default implementation here and Triton implementations registered by
``subspace_optim.kernels``.

Each op is a ``torch.library`` custom op (``torch.ops.subspace_optim.<name>``) with a fake
implementation that checks shapes and dtypes, so ``torch.compile`` sees it as one opaque
node. The environment variable ``SUBSPACE_OPTIM_KERNELS`` picks the implementation:

* ``auto`` (default): Triton for CUDA tensors when Triton imports and the op has a Triton
  kernel, PyTorch otherwise;
* ``torch``: always PyTorch;
* ``triton``: Triton wherever the op has a kernel, on CPU tensors too when
  ``TRITON_INTERPRET=1`` (Triton's interpreter); an error if Triton cannot run.

The Python functions exported here (``int4_project``, ...) are what the library calls.
When the PyTorch implementation is selected they call it directly: a custom op costs 30-90
microseconds of dispatch in eager mode, more than the small operations it would wrap, and
the plain PyTorch code is just as visible to ``torch.compile``. A kernel plugs in with
:func:`register_triton` under the op's name; nothing else changes.

The ops: the projected AdamW update (moments, normalised direction, back-projection and
weight update with decay), the block-wise 8-bit AdamW moment update (dequantise, update,
requantise), projection and back-projection with a packed INT4 basis, the stochastic-
rounding store of an INT8 weight, Grass's gather and scatter-update, and Flora's projection
and back-projection with a counter-based matrix.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable

import torch

ENV = "SUBSPACE_OPTIM_KERNELS"
SETTINGS = ("auto", "torch", "triton")

_TORCH: dict[str, Callable] = {}
_TRITON: dict[str, Callable] = {}
_kernels_loaded = False


def setting() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"{ENV}={value!r} is not a kernel setting (expected one of {SETTINGS})")
    return value


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _load_kernels() -> None:
    """Import the Triton registrations once (``subspace_optim.kernels`` imports Triton)."""
    global _kernels_loaded
    if not _kernels_loaded:
        _kernels_loaded = True
        if triton_available():
            importlib.import_module("subspace_optim.kernels.registry")


def backend(name: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"``: the implementation of op ``name`` for tensors on
    ``device`` under the current setting."""
    mode = setting()
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV}=triton, but Triton is not installed "
                               "(pip install \".[kernels]\" in the repository's checkout)")
        if device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"{ENV}=triton on {device.type} tensors needs Triton's "
                               "interpreter: set TRITON_INTERPRET=1")
        _load_kernels()
        return "triton" if name in _TRITON else "torch"
    if device.type == "cuda" and triton_available():
        _load_kernels()
        if name in _TRITON:
            return "triton"
    return "torch"


def register_triton(name: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` as op ``name``'s Triton implementation (same signature as the
    PyTorch one)."""
    def decorate(fn: Callable) -> Callable:
        if name not in _TORCH:
            raise ValueError(f"unknown op {name!r} (declared: {sorted(_TORCH)})")
        _TRITON[name] = fn
        return fn
    return decorate


def implementation(name: str, device: torch.device) -> Callable:
    return (_TRITON if backend(name, device) == "triton" else _TORCH)[name]


def define(name: str, mutates_args: tuple[str, ...] = (), device_arg: int = 0,
           opaque: bool = False):
    """Declare op ``name`` from its PyTorch implementation (whose annotated signature is the
    op's schema): the custom op ``torch.ops.subspace_optim.<name>``, whose body runs the
    selected implementation, and the function the library calls. Register the op's fake
    with ``<function>.op.register_fake``.

    ``opaque``: under ``torch.compile`` call the custom op even for the PyTorch
    implementation, so the compiler sees one node. For the counter-based generators: their
    hash reuses every intermediate, and inductor, inlining pointwise chains without common
    subexpressions, takes time exponential in the rounds to lower them."""
    def decorate(torch_impl: Callable) -> Callable:
        _TORCH[name] = torch_impl

        @functools.wraps(torch_impl)
        def body(*args):
            return implementation(name, args[device_arg].device)(*args)

        # The schema is read from the signature, evaluated where the implementation lives.
        del body.__wrapped__
        body.__signature__ = inspect.signature(torch_impl, eval_str=True)

        op = torch.library.custom_op(f"subspace_optim::{name}", body, mutates_args=mutates_args)

        @functools.wraps(torch_impl)
        def call(*args):
            if backend(name, args[device_arg].device) == "torch" and not (
                    opaque and torch.compiler.is_compiling()):
                return torch_impl(*args)
            return op(*args)

        call.op = op
        call.torch = torch_impl
        return call
    return decorate


def declared() -> tuple[str, ...]:
    return tuple(sorted(_TORCH))


def triton_registered() -> tuple[str, ...]:
    return tuple(sorted(_TRITON))


from .adamw_update import blockwise8_adamw_update, projected_adamw_update  # noqa: E402
from .flora import flora_matrix, flora_project, flora_project_back_  # noqa: E402
from .grass import grass_gather, grass_scatter_update_  # noqa: E402
from .int4 import int4_project, int4_project_back_  # noqa: E402
from .int8_store import int8_sr_store_  # noqa: E402

__all__ = [
    "ENV",
    "backend",
    "blockwise8_adamw_update",
    "declared",
    "flora_matrix",
    "flora_project",
    "flora_project_back_",
    "grass_gather",
    "grass_scatter_update_",
    "implementation",
    "int4_project",
    "int4_project_back_",
    "int8_sr_store_",
    "projected_adamw_update",
    "register_triton",
    "setting",
    "triton_registered",
]
