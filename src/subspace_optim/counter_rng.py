"""Counter-based random numbers as pure tensor functions of (seed, stream, counter).

A value is a hash of its coordinates, not the next draw of a generator: the same seed and
index give the same number on every device, in any order, inside a compiled graph (no
``torch.Generator`` object, no host read of the seed) and inside a Triton kernel, which
computes the same hash with native 32-bit integers. Flora's projection matrix and the
stochastic rounding of INT8 weights are defined this way, so that a kernel can generate
what it needs tile by tile and a resumed run draws exactly the same numbers.

The mixer is Chris Wellons' ``lowbias32`` (full avalanche, two multiplies). Tensors here
are int64 holding 32-bit values; a 32-bit multiply is split into 16-bit halves so that no
intermediate leaves the int64 range (signed overflow is undefined in the C++ that
inductor generates). Uniforms take the top 24 bits of a hash, so every value is an exact
float32 in (0, 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
# lowbias32's multipliers and shifts (https://nullprogram.com/blog/2018/07/31/).
MUL1, MUL2 = 0x7FEB352D, 0x846CA68B
# Odd constants (the golden ratio's and sqrt(3)'s fraction bits) that separate streams.
GOLDEN = 0x9E3779B9
STREAM2 = 0xBB67AE85
TWO_PI = 2.0 * math.pi


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for 32-bit values in int64 without overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MUL2)
    return x ^ (x >> 16)


def key(seed: Tensor | int, stream: Tensor | int = 0) -> Tensor:
    """A 32-bit key from a 63-bit seed and a stream number (e.g. the step), as an int64
    tensor; a 0-d seed gives a 0-d key."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    stream = torch.as_tensor(stream, dtype=torch.int64)
    k = mix32((seed & MASK32) ^ GOLDEN)
    k = mix32(k ^ ((seed >> 32) & MASK32))
    k = mix32(k ^ (stream & MASK32))
    return mix32(k ^ ((stream >> 32) & MASK32) ^ STREAM2)


def bits(k: Tensor, counter: Tensor) -> Tensor:
    """32 random bits per element of ``counter`` (int64, >= 0) under key ``k``."""
    x = mix32((counter & MASK32) ^ k)
    return mix32(x ^ (counter >> 32) ^ GOLDEN)


def uniform(k: Tensor, counter: Tensor) -> Tensor:
    """float32 uniforms in (0, 1): the top 24 bits of a hash, plus half a step."""
    return ((bits(k, counter) >> 8).to(torch.float32) + 0.5) * (2.0**-24)


def gaussian(k: Tensor, counter: Tensor) -> Tensor:
    """float32 standard normals by Box-Muller from two uniforms of the same counter (the
    second from the first's hash, so one counter gives one normal)."""
    h1 = bits(k, counter)
    h2 = mix32(h1 ^ STREAM2)
    u1 = ((h1 >> 8).to(torch.float32) + 0.5) * (2.0**-24)
    u2 = ((h2 >> 8).to(torch.float32) + 0.5) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(TWO_PI * u2)


def gaussian_matrix(seed: Tensor | int, shape: tuple[int, int], device: torch.device,
                    stream: int = 0) -> Tensor:
    """``rows x cols`` float32 normals; element ``(i, j)`` is ``gaussian`` of counter
    ``i * cols + j``. The key stays a 0-d CPU tensor, which operations on ``device``
    read as a scalar: no copy to the device, no synchronisation."""
    rows, cols = shape
    counter = torch.arange(rows * cols, device=device, dtype=torch.int64).view(rows, cols)
    return gaussian(key(seed, stream), counter)
