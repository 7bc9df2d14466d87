"""Importing this module registers every Triton kernel on its op (``subspace_optim.ops``);
``ops.backend`` imports it on first use when Triton is available."""

from . import adamw, flora, grass, int4, int8_store  # noqa: F401
