"""Where the inner rule's moments live, at the precision the group's ``state_bits`` asks for.

The rule always works on *compute* tensors, updated in place: the stored tensor itself when
it already has the compute dtype, otherwise a float32 copy that is written back after the
update. ``state_bits``:

* ``None`` (default): the gradient's dtype, as torch's AdamW and galore-torch store them;
* ``32``: float32 whatever the parameter's dtype;
* ``16``: bfloat16 storage, float32 arithmetic;
* ``8``: block-wise 8-bit codes (block 256, dynamic map) plus one float32 absmax per block,
  under the key ``<name>_absmax``; float32 arithmetic on the dequantised values. Moments of
  fewer than 4096 elements (the group key ``min_8bit_size``) stay float32, as bitsandbytes
  does (quantising them saves little and costs accuracy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit

STATE_BITS = (None, 32, 16, 8)
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size
ABSMAX = "_absmax"


def compute_dtype(bits: int | None, grad: Tensor) -> torch.dtype:
    return grad.dtype if bits is None else torch.float32


def init_moment(state: dict, name: str, shape: tuple[int, ...], grad: Tensor,
                bits: int | None, signed: bool, min_8bit_size: int = MIN_8BIT_SIZE) -> None:
    zeros = torch.zeros(shape, dtype=compute_dtype(bits, grad), device=grad.device)
    store_moment(state, name, zeros, bits, signed, min_8bit_size)


def load_moment(state: dict, name: str, bits: int | None, signed: bool) -> Tensor:
    stored = state[name]
    if stored.dtype == torch.uint8:
        return dequantize_blockwise_8bit(stored, state[name + ABSMAX], signed)
    if bits is not None and stored.dtype != torch.float32:
        return stored.float()
    return stored


def store_moment(state: dict, name: str, value: Tensor, bits: int | None, signed: bool,
                 min_8bit_size: int = MIN_8BIT_SIZE) -> None:
    if bits == 8 and value.numel() >= min_8bit_size:
        state[name], state[name + ABSMAX] = quantize_blockwise_8bit(value, signed)
    elif bits == 16:
        state[name] = value.to(torch.bfloat16)
    elif state.get(name) is not value:
        state[name] = value
