"""Group-wise asymmetric min-max integer quantisation (Q-GaLore's projector and weights).

A flattened tensor is cut into groups of ``group_size`` consecutive elements (the last
group may be partial; it is padded with zeros, which cost nothing because zero is always
inside the range). Each group stores a scale ``s`` and a zero-point ``z`` and each element
a code ``q`` in ``[0, 2^bits - 1]``; the value is ``s * (q - z)``.

Unlike Q-GaLore's reference, the range is widened to include zero before the scale is
chosen. The reference clamps the zero-point into the code range, so a group whose values
all share one sign is clipped (``[1, 2]`` comes back as ``[1, 1]``; unsloth PR #10841).
Here zero is exactly representable (``q = z``) and every element comes back within half a
quantisation step, ``s / 2``. 4-bit codes are packed two per byte (low nibble first); the
reference stores one per byte, which saves nothing over INT8.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# Smallest range a group may have: the reference's clamp, which keeps the scale finite for
# an all-zero group.
MIN_RANGE = 1e-5


def pack_int4(codes: Tensor) -> Tensor:
    """Pack a flat uint8 tensor of values in [0, 15] two per byte (odd sizes padded)."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1))
    return codes[0::2] | (codes[1::2] << 4)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` 4-bit values as uint8."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(-1)[:numel]


def _grouped(x: Tensor, group_size: int) -> tuple[Tensor, int, Tensor, Tensor]:
    """``x`` flattened into rows of ``group_size`` (zero-padded), its size, and each row's
    range widened to include zero."""
    flat = x.detach().reshape(-1).float()
    numel = flat.numel()
    groups = math.ceil(numel / group_size)
    w = F.pad(flat, (0, groups * group_size - numel)).view(groups, group_size)
    return w, numel, w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)


def quantize_groupwise(
    x: Tensor, bits: int = 4, group_size: int = 256
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantise ``x`` (any shape, floating) to ``(codes, scales, zeros)``.

    codes: uint8, ``ceil(numel / 2)`` bytes for 4 bits, ``numel`` for 8 bits;
    scales: float32, one per group; zeros: uint8, one per group.
    """
    if bits not in (4, 8):
        raise ValueError(f"Invalid bits: {bits!r} (supported: 4, 8)")
    if group_size < 1:
        raise ValueError(f"Invalid group_size: {group_size!r} (must be >= 1)")
    w, numel, lo, hi = _grouped(x, group_size)
    qmax = 2**bits - 1
    scales = (hi - lo).clamp(min=MIN_RANGE) / qmax
    zeros = torch.round(-lo / scales).clamp(0, qmax)
    q = (torch.round(w / scales[:, None]) + zeros[:, None]).clamp(0, qmax)
    codes = q.to(torch.uint8).reshape(-1)[:numel]
    if bits == 4:
        codes = pack_int4(codes)
    return codes, scales, zeros.to(torch.uint8)


def quantize_groupwise_stochastic(
    x: Tensor, group_size: int, uniform: Callable[[int], Tensor], bits: int = 8
) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`quantize_groupwise` (unpacked codes) but with stochastic rounding:
    ``q = floor(x / s) + [u < frac(x / s)] + z`` with ``u`` uniform in (0, 1), so that
    ``E[s (q - z)] = x`` exactly. ``uniform(count)`` returns ``count`` float32 uniforms, one
    per element of the zero-padded groups, in order (a counter-based draw, so that the same
    seed gives the same rounding anywhere).

    For that expectation to hold at the ends of a group's range too, no draw may be
    clipped: the grid uses ``s = range / (2^bits - 2)`` and ``z = ceil(-lo / s)``, which
    keeps ``floor`` and ``ceil`` of every value inside ``[0, 2^bits - 1]``. (Q-GaLore's
    reference uses the nearest-rounding grid and clips, which biases values near the ends.)
    """
    w, numel, lo, hi = _grouped(x, group_size)
    qmax = 2**bits - 1
    scales = (hi - lo).clamp(min=MIN_RANGE) / (qmax - 1)
    zeros = torch.ceil(-lo / scales).clamp(0, qmax - 1)
    scaled = w / scales[:, None]
    low = torch.floor(scaled)
    up = uniform(scaled.numel()).view(scaled.shape) < (scaled - low)
    q = (low + up + zeros[:, None]).clamp(0, qmax)
    return q.to(torch.uint8).reshape(-1)[:numel], scales, zeros.to(torch.uint8)


def dequantize_groupwise(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    numel: int,
    bits: int = 4,
    group_size: int = 256,
) -> Tensor:
    """The flat float32 tensor of ``numel`` values that :func:`quantize_groupwise` encoded."""
    flat = codes.reshape(-1)
    q = unpack_int4(flat, numel) if bits == 4 else flat[:numel]
    groups = scales.numel()
    q = F.pad(q, (0, groups * group_size - numel)).view(groups, group_size).float()
    return ((q - zeros[:, None].float()) * scales[:, None]).reshape(-1)[:numel]
