"""The optimizer state of FSDP2-sharded parameters in state dicts.

Inside the optimizer each rank keeps plain tensors: its rows of the state that is sharded
like the weight, and the whole of replicated state (bases, left-side moments, the state of
rules that reduce across rows; see ``distributed.fsdp``). A step never dispatches through
DTensor. ``state_dict()`` presents the sharded entries as DTensors (``Shard(0)``, sharing
storage), so that ``torch.distributed.checkpoint`` saves each row once and can load them
into another number of ranks; replicated entries stay plain tensors, which it saves once.
8-bit moments keep their codes (a uint8 DTensor, sharded like the weight); their block
absmax, whose blocks of 256 follow each rank's shard and would be cut differently by another
number of ranks, is presented per row (``(rows, blocks per row)``, the scale of each row's
elements; rows of a width that divides 256 or is a multiple of it never straddle a block).
``load_state_dict`` takes this rank's rows and rebuilds the block absmax: exactly when each
new block's rows share one scale (always with the world size unchanged, and whenever the
shards hold multiples of 256 elements), otherwise by dequantising with the per-row scales
and quantising again (within one code). Other widths are presented dequantised (float32)
and quantised again on load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..optim import moments
from ..projectors.base import matrix_shape, projected_shape, resolve_side
from ..quant.blockwise import BLOCK_SIZE, dequantize_blockwise_8bit, dynamic_map
from .fsdp import layout
from .sharding import as_dtensor, is_dtensor, local, row_shard

if TYPE_CHECKING:
    from ..optim.base import SubspaceOptimizer


def _global_specs(opt: SubspaceOptimizer, p, group: dict) -> dict[str, tuple[tuple, bool]]:
    if opt.projects(p, group):
        shape = matrix_shape(p.shape)
        shape = projected_shape(shape, group["rank"], resolve_side(shape, group["proj_type"]))
    else:
        shape = tuple(p.shape)
    return opt._moment_specs(shape, group)


def _params(opt: SubspaceOptimizer):
    """``(index in the state dict, parameter, group)``, in torch's numbering."""
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            yield index, p, group
            index += 1


def present(opt: SubspaceOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` (torch's, whose per-parameter dicts are the live ones) with the sharded
    entries of sharded parameters as DTensors; the live state is not changed."""
    state = state_dict["state"]
    for index, p, group in _params(opt):
        if index not in state or not is_dtensor(p) or layout(opt, p, group) != "rows":
            continue
        shard = row_shard(p)
        entry = dict(state[index])
        for name, (shape, signed) in _global_specs(opt, p, group).items():
            value = entry.get(name)
            if value is None:
                continue
            if value.dtype == torch.uint8:
                absmax = entry.pop(name + moments.ABSMAX)
                scales = _row_scales(absmax, value)
                if scales is None:
                    value = dequantize_blockwise_8bit(value, absmax, signed)
                else:
                    entry[name + moments.ABSMAX] = as_dtensor(
                        scales, shard, (shape[0], scales.shape[1]))
            entry[name] = as_dtensor(value, shard, tuple(shape))
        state[index] = entry
    return state_dict


def _width(codes: torch.Tensor) -> int:
    return codes[0].numel() if codes.dim() > 1 else 0


def _row_scales(absmax: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
    """The block absmax of ``codes`` (rows of ``width`` elements, flattened into blocks of
    256) as ``(rows, blocks per row)``, or ``None`` when rows straddle blocks."""
    rows, width = codes.shape[0], _width(codes)
    if width and BLOCK_SIZE % width == 0:
        return absmax[torch.arange(rows, device=absmax.device) * width // BLOCK_SIZE, None]
    if width and width % BLOCK_SIZE == 0:
        return absmax.view(rows, width // BLOCK_SIZE)
    return None


def _block_absmax(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
    """The block absmax of this rank's ``codes`` from their per-row ``scales``, or ``None``
    when a block holds rows of different scales."""
    width = _width(codes)
    flat = scales.repeat_interleave(width // scales.shape[1], dim=1).reshape(-1)
    pad = -flat.numel() % BLOCK_SIZE
    padded = torch.nn.functional.pad(flat, (0, pad), value=float("nan"))
    blocks = padded.view(-1, BLOCK_SIZE)
    first = blocks[:, 0:1]
    same = (blocks == first) | blocks.isnan()
    return first.squeeze(1).contiguous() if bool(same.all()) else None


def localize(opt: SubspaceOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``state_dict`` with every DTensor replaced by this rank's shard."""
    state = {}
    for key, entry in state_dict.get("state", {}).items():
        if isinstance(entry, dict) and any(is_dtensor(v) for v in entry.values()):
            entry = {k: local(v) if is_dtensor(v) else v for k, v in entry.items()}
        state[key] = entry
    return {**state_dict, "state": state}


def requantize(opt: SubspaceOptimizer) -> None:
    """Rebuild the block absmax of 8-bit moments from their per-row scales, and quantise
    those that came in dequantised (see the module docstring)."""
    for _, p, group in _params(opt):
        if group.get("state_bits") != 8 or not is_dtensor(p) or p not in opt.state:
            continue
        state = opt.state[p]
        for name, (_, signed) in _global_specs(opt, p, group).items():
            value = state.get(name)
            if value is None:
                continue
            key = name + moments.ABSMAX
            if value.dtype != torch.uint8:
                moments.store_moment(state, name, value.float(), 8, signed)
            elif state[key].dim() == 2:
                scales = state[key]
                absmax = _block_absmax(scales, value)
                if absmax is not None:
                    state[key] = absmax
                else:
                    per_element = scales.repeat_interleave(
                        _width(value) // scales.shape[1], dim=1).view(value.shape)
                    decoded = dynamic_map(signed, value.device)[value.long()] * per_element
                    moments.store_moment(state, name, decoded, 8, signed)
