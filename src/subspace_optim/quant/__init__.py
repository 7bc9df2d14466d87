"""Quantisers as pure functions on tensors, shared by projectors, states and kernels."""

from .groupwise import (
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    quantize_groupwise_stochastic,
    unpack_int4,
)

__all__ = [
    "dequantize_groupwise",
    "pack_int4",
    "quantize_groupwise",
    "quantize_groupwise_stochastic",
    "unpack_int4",
]
