"""Layers that cooperate with the optimizers: INT8 weights updated with stochastic rounding,
and Grass's sparse weight-gradient path."""

from .grass_linear import GrassLinear
from .int8_linear import (
    Int8Linear,
    dequantize_linear_layers,
    int8_layer_of,
    quantize_linear_layers,
)

__all__ = [
    "GrassLinear",
    "Int8Linear",
    "dequantize_linear_layers",
    "int8_layer_of",
    "quantize_linear_layers",
]
