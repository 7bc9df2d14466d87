"""Layers that cooperate with the optimizers: INT8 weights updated with stochastic rounding."""

from .int8_linear import (
    Int8Linear,
    dequantize_linear_layers,
    int8_layer_of,
    quantize_linear_layers,
)

__all__ = ["Int8Linear", "dequantize_linear_layers", "int8_layer_of", "quantize_linear_layers"]
