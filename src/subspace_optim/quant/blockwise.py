"""Block-wise 8-bit quantisation with bitsandbytes' dynamic maps (Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", ICLR 2022): the storage of 8-bit optimizer states.

Each block of 256 consecutive values keeps its absolute maximum in float32; values are
divided by it and encoded as the index of the nearest entry of a 256-entry dynamic
(exponent-mantissa) map, signed for first moments and unsigned for second moments, as in
bitsandbytes' own 8-bit Adam. bitsandbytes >= 0.50 runs this on the CPU as well as CUDA.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

BLOCK_SIZE = 256  # bitsandbytes' block size for optimizer states since 0.44


def _functional():
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise ImportError(
            "8-bit optimizer states need bitsandbytes>=0.50, which is not installed: "
            "pip install 'subspace-optim[bnb]'"
        ) from None
    return functional


@cache
def dynamic_map(signed: bool, device: torch.device) -> Tensor:
    return _functional().create_dynamic_map(signed=signed).to(device)


def quantize_blockwise_8bit(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)``: uint8 codes of ``x``'s shape and one float32 absmax per block."""
    code = dynamic_map(signed, x.device)
    codes, quant_state = _functional().quantize_blockwise(
        x.float().contiguous(), code=code, blocksize=BLOCK_SIZE
    )
    return codes.view(x.shape), quant_state.absmax


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The float32 tensor that :func:`quantize_blockwise_8bit` encoded."""
    code = dynamic_map(signed, codes.device)
    out = _functional().dequantize_blockwise(
        codes.contiguous(), absmax=absmax, code=code, blocksize=BLOCK_SIZE
    )
    return out.view(codes.shape)
