"""Op: the stochastic-rounding store of an INT8 weight (Q-GaLore's weight quantisation).

``int8_sr_store_`` quantises a float weight into its uint8 codes, one float32 scale and
one uint8 zero-point per group of ``group_size`` consecutive elements, with stochastic
rounding ``floor(w / s) + [u < frac(w / s)]`` on a grid where no draw is clipped, so that
the stored weight equals the float one in expectation
(``quant.groupwise.quantize_groupwise_stochastic``). The uniforms ``u`` are counter-based:
``uniform(key(seed, offset), i)`` for element ``i`` of the zero-padded groups, so a resumed
run (same seed and offset, the step) rounds exactly as the uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import counter_rng
from ..quant.groupwise import quantize_groupwise_stochastic
from . import define


@define("int8_sr_store_", mutates_args=("codes", "scales", "zeros"), device_arg=3, opaque=True)
def int8_sr_store_(codes: Tensor, scales: Tensor, zeros: Tensor, weight: Tensor, seed: int,
                   offset: int, group_size: int) -> None:
    k = counter_rng.key(seed, offset)

    def uniform(count: int) -> Tensor:
        return counter_rng.uniform(k, torch.arange(count, device=weight.device))

    q, s, z = quantize_groupwise_stochastic(weight, group_size, uniform)
    codes.copy_(q.view_as(codes))
    scales.copy_(s)
    zeros.copy_(z)


@int8_sr_store_.op.register_fake
def _(codes, scales, zeros, weight, seed, offset, group_size):
    torch._check(codes.dtype == torch.uint8 and codes.numel() == weight.numel(),
                 lambda: "codes: uint8 of the weight's size")
    torch._check(scales.numel() == zeros.numel() == -(-weight.numel() // group_size),
                 lambda: "one scale and zero-point per group")
