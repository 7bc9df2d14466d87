"""Block-wise 8-bit quantisation with bitsandbytes' dynamic maps (Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", ICLR 2022): the storage of 8-bit optimizer states.

Each block of 256 consecutive values keeps its absolute maximum in float32; values are
multiplied by its reciprocal and encoded as the index of the nearest entry of a 256-entry
dynamic (exponent-mantissa) map, signed for first moments and unsigned for second moments,
as in bitsandbytes' own 8-bit Adam. The map is bitsandbytes' (so states decode with
``bitsandbytes.functional.dequantize_blockwise``); the encoding is written here in PyTorch
because bitsandbytes' native CPU encoder searches the map approximately and disagrees with
the exact nearest entry on about 0.2% of values, and the Triton kernel
(``kernels/adamw.py``) must reproduce this function code for code.

Nearest means: the number of midpoints between consecutive map entries that lie strictly
below the scaled value (ties go to the lower entry), the rule of bitsandbytes' default
PyTorch backend.
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

BLOCK_SIZE = 256  # bitsandbytes' block size for optimizer states since 0.44
TINY = 1e-38  # an all-zero block scales by 1/TINY: its codes are the map's zero


def _functional():
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise ImportError(
            "8-bit optimizer states need bitsandbytes>=0.50, which is not installed: "
            "pip install \".[bnb]\" (in the repository's checkout)"
        ) from None
    return functional


@cache
def dynamic_map(signed: bool, device: torch.device) -> Tensor:
    return _functional().create_dynamic_map(signed=signed).to(device)


@cache
def midpoints(signed: bool, device: torch.device) -> Tensor:
    """The 255 midpoints of the sorted map, then +inf: 256 entries, so a kernel can load
    them as one power-of-two vector."""
    code = dynamic_map(signed, device)
    mids = (code[:-1] + code[1:]) / 2
    return torch.cat((mids, torch.full((1,), math.inf, device=device)))


def _blocks(x: Tensor) -> Tensor:
    flat = x.reshape(-1)
    pad = -flat.numel() % BLOCK_SIZE
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, BLOCK_SIZE)


def quantize_blockwise_8bit(x: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)``: uint8 codes of ``x``'s shape and one float32 absmax per block."""
    blocks = _blocks(x.float())
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=TINY)).unsqueeze(1)).clamp_(-1.0, 1.0)
    codes = torch.bucketize(scaled, midpoints(signed, x.device)[:-1], out_int32=True)
    return codes.to(torch.uint8).view(-1)[: x.numel()].view(x.shape), absmax


def dequantize_blockwise_8bit(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The float32 tensor that :func:`quantize_blockwise_8bit` encoded."""
    values = dynamic_map(signed, codes.device)[_blocks(codes).long()] * absmax.unsqueeze(1)
    return values.view(-1)[: codes.numel()].view(codes.shape)
