"""DDP and FSDP2 against the single-process run, with 2 gloo ranks on the CPU.

Every optimizer class trains 10 steps under DDP (ordinary and layer-wise) and FSDP2 on the
same global batches as one process. Tolerances, relative to each tensor's largest
magnitude: DDP 1e-6 (the reduced gradient is a mean over ranks, rounded once more than the
one-process gradient; measured ~1e-15 in float64), FSDP2 1e-5 (the projection of the left
side is also summed over ranks; measured ~1e-15 in float64; the 8-bit case, float32, flips
codes where a moment sits at a midpoint of the map, measured ~1e-7).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_cases import (
    STEPS,
    Case,
    build_model,
    build_optimizer,
    dcp_continue,
    reference,
    worker,
)
from optim_db import OPTIMIZERS

import subspace_optim as so

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
# The 8-bit case: right side (moments sharded like the weight, blocks aligned to the
# shards) and one subspace for the 10 steps. With a refresh, elementwise kernels on shards
# of another length than the whole (vector body vs tail) differ in an fp32 moment by one
# ulp, the SVD magnifies that (measured: basis 3e-6 apart after one refresh) and 8-bit
# codes flip (2e-4 apart); without one the runs agree to rounding.
EIGHT_BIT_GROUP = {"proj_type": "right", "update_proj_gap": 200}
DDP_TOL = 1e-6
FSDP_TOL = 1e-5

CASES = (
    [Case(f"ddp-{n}", n, "ddp") for n in OPTIMIZERS]
    + [Case(f"ddp-layerwise-{n}", n, "ddp", layerwise=True) for n in OPTIMIZERS]
    + [Case("ddp-layerwise-accumulate-clip-GaLoreAdamW", "GaLoreAdamW", "ddp", layerwise=True,
            accumulation=2, max_grad_norm=0.05),
       Case("ddp-layerwise-accumulate-SubspaceLion", "SubspaceLion", "ddp", layerwise=True,
            accumulation=2)]
    + [Case(f"fsdp-{n}", n, "fsdp") for n in OPTIMIZERS]
    + [Case("fsdp-GaLoreAdamW-proj_type-left", "GaLoreAdamW", "fsdp",
            group={"proj_type": "left"}),
       Case("fsdp-big-GaLoreAdamW8bit", "GaLoreAdamW8bit", "fsdp", big=True,
            split_reference=True, group=EIGHT_BIT_GROUP),
       Case("fsdp-clip-GaLoreAdamW", "GaLoreAdamW", "fsdp", max_grad_norm=0.05)]
    + [Case(f"fsdp-state_bits-{bits}-{n}", n, "fsdp", group={"state_bits": bits})
       for bits in (16, 32) for n in ("GaLoreAdamW", "SubspaceLion", "GaLoreAdafactor")]
)
DCP_CASES = [Case("dcp-GaLoreAdamW", "GaLoreAdamW", "dcp"),
             Case("dcp-big-GaLoreAdamW8bit", "GaLoreAdamW8bit", "dcp", big=True,
                  split_reference=True, group=EIGHT_BIT_GROUP)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn of two ranks runs every case; returns the folder of their results."""
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(worker, args=(WORLD, _free_port(), CASES + DCP_CASES, str(out)), nprocs=WORLD)
    return out


def _max_relative_diff(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(((got[k] - want[k]).abs().max() / want[k].abs().max()).item() for k in want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_process(runs, case):
    got = torch.load(runs / f"{case.name}.pt", weights_only=True)
    want = reference(case)
    tol = DDP_TOL if case.mode == "ddp" else FSDP_TOL
    diff = _max_relative_diff(got, want)
    assert diff <= tol, f"{case.name}: {diff:.3g} > {tol}"
    # The run trained (the comparison is not of two untouched models).
    start = build_model(case.big).state_dict()
    assert _max_relative_diff(want, start) > 1e-3


def test_two_rank_checkpoint_continues_in_one_process(runs):
    """DCP saved by 2 FSDP2 ranks at step 5, loaded into a plain model in one process
    (resharding), continued to step 10: equals the uninterrupted run."""
    case = DCP_CASES[0]
    got = dcp_continue(case, 0, 1, str(runs / case.name), STEPS // 2, sharded=False)
    diff = _max_relative_diff(got, reference(case))
    assert diff <= FSDP_TOL, diff


def test_eight_bit_checkpoint_round_trips_sharded(runs):
    """8-bit moments saved and loaded by the same 2 ranks continue as the uninterrupted run."""
    case = DCP_CASES[1]
    got = torch.load(runs / f"{case.name}.pt", weights_only=True)
    diff = _max_relative_diff(got, reference(case))
    assert diff <= FSDP_TOL, diff


def test_layerwise_needs_the_ddp_model_when_distributed(monkeypatch):
    """With more than one rank and no DDP model, the hooks would step on this rank's own
    gradient: refused."""
    from subspace_optim.distributed import sharding

    monkeypatch.setattr(sharding, "world_size", lambda: 2)
    model = build_model(False)
    opt = build_optimizer(Case("x", "GaLoreAdamW"), model)
    with pytest.raises(RuntimeError, match="ddp=model"):
        so.step_in_backward(opt)
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        so.step_in_backward(opt, ddp=model)


def test_refused_combinations_name_the_reason(runs):
    """Under 2 ranks: no_sync() with layer-wise DDP, layer-wise FSDP2, INT8 weights."""
    messages = torch.load(runs / "refusals.pt", weights_only=True)
    assert "no_sync" in messages.get("no_sync", "")
    assert "FSDP2" in messages.get("fsdp_layerwise", "")
    assert "not supported with 2 ranks" in messages.get("int8", "")


@pytest.mark.parametrize("width,rows", [(8, 128), (512, 6), (1024, 3)])
def test_eight_bit_scales_per_row_rebuild_any_aligned_sharding(width, rows):
    """The per-row presentation of a block absmax gives back each shard's blocks: exactly
    when shards hold multiples of 256 elements, within one code otherwise."""
    from subspace_optim.distributed.state import _block_absmax, _row_scales
    from subspace_optim.quant.blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit

    torch.manual_seed(0)
    value = torch.randn(rows, width)
    codes, absmax = quantize_blockwise_8bit(value, signed=True)
    scales = _row_scales(absmax, codes)
    assert scales is not None and scales.shape[0] == rows
    aligned = [rows // 2, rows - rows // 2] if (rows // 2) * width % 256 == 0 else None
    if aligned:
        parts = zip(codes.split(aligned), scales.split(aligned), absmax.split(
            [n * width // 256 for n in aligned]), strict=True)
        for part_codes, part_scales, part_absmax in parts:
            assert torch.equal(_block_absmax(part_scales, part_codes), part_absmax)
    odd = codes[1:], scales[1:]  # a shard that starts inside a block
    if 256 % width == 0 and width < 256:
        assert _block_absmax(odd[1], odd[0]) is None
    decoded = dequantize_blockwise_8bit(codes, absmax, signed=True)
    assert torch.equal(dequantize_blockwise_8bit(codes, _block_absmax(scales, codes), True),
                       decoded)


def test_refreshes_are_dealt_out_to_owner_ranks(runs):
    """A refresh of the 3 matrices: rank 0 computes 2 SVDs, rank 1 one (round-robin), and
    every rank ends with the same bases (broadcast)."""
    work = torch.load(runs / "refresh_work.pt", weights_only=True)
    for mode in ("ddp", "fsdp"):
        assert work[mode]["calls"] == [2, 1], (mode, work[mode])
        assert work[mode]["same"], mode


def test_a_ddp_model_takes_a_second_stepper_and_averages_after_removal(runs):
    work = torch.load(runs / "refresh_work.pt", weights_only=True)["reattach"]
    assert work == {"same_on_every_rank": True, "averaged": True, "stepped_in_backward": True}
