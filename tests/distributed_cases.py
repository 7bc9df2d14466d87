"""Training runs of test_distributed.py: each case trains the same model on the same global
batches, in one process or under DDP or FSDP2 with gloo ranks on the CPU.

The ranks of one spawn run every case in turn (one process group, one import of the
library per process), and rank 0 saves each case's final parameters; the test process runs
the single-process references and compares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from optim_db import OPTIMIZERS, PROJECTORS
from torch import nn

import subspace_optim as so

STEPS = 10
BATCH = 16


@dataclass(frozen=True)
class Case:
    name: str
    optimizer: str
    mode: str = "none"  # "ddp" or "fsdp"
    layerwise: bool = False
    accumulation: int = 1
    max_grad_norm: float | None = None
    big: bool = False  # the 8-bit model: every shard's moments of at least 4096 elements
    # The single-process reference backpropagates each rank's part separately (see
    # :func:`reference`).
    split_reference: bool = False
    group: dict[str, Any] = field(default_factory=dict)


def build_model(big: bool) -> nn.Module:
    torch.manual_seed(0)
    if big:
        # Row-sharded over 2 ranks, the right-side moments of the first weight (1024 x 8)
        # give each rank 4096 elements (16 blocks of 256).
        dims, dtype = (128, 1024, 8), torch.float64
    else:
        # Left and right projections, and an odd number of rows (7: shards of 4 and 3).
        dims, dtype = (40, 24, 56, 7), torch.float64
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def build_optimizer(case: Case, model: nn.Module) -> torch.optim.Optimizer:
    record = OPTIMIZERS[case.optimizer]
    mats = [m.weight for m in model if isinstance(m, nn.Linear)]
    others = [m.bias for m in model if isinstance(m, nn.Linear)]
    projected = {"params": mats, "rank": 8 if case.big else 4, "update_proj_gap": 3,
                 **case.group}
    name = projected.get("projector", getattr(record.cls, "default_projector", None))
    if name in PROJECTORS:
        projected = {**PROJECTORS[name].small, **projected}
    kwargs = {"lr": 1e-2} if record.has_lr else {}
    return record.make([{"params": others}, projected], **kwargs)


def batches(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dims = (128, 8) if case.big else (40, 7)
    dtype = torch.float64
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, dims[0], generator=g, dtype=dtype),
             torch.randn(BATCH, dims[1], generator=g, dtype=dtype)) for _ in range(STEPS)]


def train(case: Case, model: nn.Module, opt: torch.optim.Optimizer, data, rank: int = 0,
          world: int = 1, ddp: nn.Module | None = None, start: int = 0,
          stop: int | None = None, parts: int = 1) -> None:
    """Steps ``start..stop`` of ``case``. Micro-batch ``j`` of a step is the same global
    sample range in every world size (rank ``k`` takes its part), so that a subspace fixed at
    a window's first micro-batch is the same one. ``parts > 1`` (one process): backpropagate
    the ``parts`` ranks' parts of each micro-batch one after the other, each loss divided by
    ``parts``: the gradient is then the ranks' average bit for bit (a division by a power of
    two is exact)."""
    forward = ddp or model
    handle = None
    if case.layerwise:
        handle = so.step_in_backward(opt, case.accumulation, max_grad_norm=case.max_grad_norm,
                                     ddp=ddp)
    k = case.accumulation
    for x, y in data[start:stop]:
        micro = x.shape[0] // k
        part = micro // world
        for j in range(k):
            for r in range(parts):
                size = part // parts
                lo = j * micro + rank * part + r * size
                loss = nn.functional.mse_loss(forward(x[lo:lo + size]), y[lo:lo + size])
                (loss / (k * parts)).backward()
        if not case.layerwise and case.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), case.max_grad_norm)
        opt.step()
        opt.zero_grad()
    if handle is not None:
        handle.remove()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def reference(case: Case, world: int = 2) -> dict[str, torch.Tensor]:
    """The single-process run of ``case`` (``world``: the ranks whose parts a
    ``split_reference`` backpropagates)."""
    model = build_model(case.big)
    opt = build_optimizer(case, model)
    train(case, model, opt, batches(case), parts=world if case.split_reference else 1)
    return full_state(model)


def shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)


def run_case(case: Case, rank: int, world: int) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    model = build_model(case.big)
    ddp = None
    if case.mode == "ddp":
        # Small buckets: several per backward, so a layer-wise step spans buckets.
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.002)
    else:
        shard(model)
    opt = build_optimizer(case, model)
    train(case, model, opt, batches(case), rank, world, ddp)
    return full_state(model)


def dcp_save(case: Case, rank: int, world: int, directory: str, steps: int) -> None:
    """Train ``steps`` steps sharded, and save model and optimizer with DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = build_model(case.big)
    shard(model)
    opt = build_optimizer(case, model)
    train(case, model, opt, batches(case), rank, world, stop=steps)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=directory)


def dcp_continue(case: Case, rank: int, world: int, directory: str, steps: int,
                 sharded: bool) -> dict[str, torch.Tensor]:
    """Load the checkpoint of :func:`dcp_save` (into a sharded or a plain model) and train
    the remaining steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = build_model(case.big)
    if sharded:
        shard(model)
    opt = build_optimizer(case, model)
    model_sd, optim_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=directory, no_dist=not sharded)
    set_state_dict(model, opt, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"])
    train(case, model, opt, batches(case), rank, world, start=steps)
    return full_state(model)


def refusals(rank: int, world: int) -> dict[str, str]:
    """The errors of the combinations that would train wrong with several ranks."""
    from torch.nn.parallel import DistributedDataParallel

    from subspace_optim.nn import Int8Linear

    messages = {}
    case = Case("refusal", "GaLoreAdamW")
    model = build_model(False)
    ddp = DistributedDataParallel(model)
    opt = build_optimizer(case, model)
    so.step_in_backward(opt, ddp=ddp)
    x = torch.randn(4, 40, dtype=torch.float64)
    try:
        with ddp.no_sync():
            ddp(x).sum().backward()
    except RuntimeError as error:
        messages["no_sync"] = str(error)
    sharded = build_model(False)
    shard(sharded)
    try:
        so.step_in_backward(build_optimizer(case, sharded))
    except RuntimeError as error:
        messages["fsdp_layerwise"] = str(error)
    layer = Int8Linear.from_linear(nn.Linear(64, 32), group_size=64)
    int8_opt = so.QGaLoreAdamW8bit([{"params": [layer.weight], "rank": 4}], lr=1e-2)
    layer(torch.randn(2, 64)).sum().backward()
    try:
        int8_opt.step()
    except RuntimeError as error:
        messages["int8"] = str(error)
    return messages


def refresh_work(rank: int, world: int) -> dict[str, Any]:
    """SVDs each rank computes in a refresh of the 3 matrices under DDP and FSDP2, and
    whether every rank ends with the same bases."""
    from torch.nn.parallel import DistributedDataParallel

    from subspace_optim.projectors import svd

    calls = {"n": 0}
    original = svd.refreshed_basis

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    svd.refreshed_basis = counting
    report: dict[str, Any] = {}
    try:
        for mode in ("ddp", "fsdp"):
            case = Case("refresh", "GaLoreAdamW", mode)
            model = build_model(False)
            forward = DistributedDataParallel(model) if mode == "ddp" else model
            if mode == "fsdp":
                shard(model)
            opt = build_optimizer(case, model)
            calls["n"] = 0
            train(case, model, opt, batches(case)[:1], rank, world,
                  ddp=forward if mode == "ddp" else None)
            bases = [opt.state[p]["proj_basis"] for p in opt.state if "proj_basis" in opt.state[p]]
            every = [None] * world
            dist.all_gather_object(every, (calls["n"], [b.tolist() for b in bases]))
            report[mode] = {"calls": [c for c, _ in every],
                            "same": all(b == every[0][1] for _, b in every)}
    finally:
        svd.refreshed_basis = original
    return report


def reattach(rank: int, world: int) -> dict[str, bool]:
    """A DDP model's layer-wise stepper removed and another attached (DDP takes one
    communication hook for its lifetime), then removed too: DDP averages again."""
    from torch.nn.parallel import DistributedDataParallel

    case = Case("reattach", "GaLoreAdamW", "ddp", layerwise=True)
    model = build_model(False)
    ddp = DistributedDataParallel(model)
    opt = build_optimizer(case, model)
    data = batches(case)
    for _ in range(2):
        handle = so.step_in_backward(opt, ddp=ddp)
        x, y = data[0]
        nn.functional.mse_loss(ddp(x[rank::world]), y[rank::world]).backward()
        opt.step()
        handle.remove()
    x, y = data[1]
    nn.functional.mse_loss(ddp(x[rank::world]), y[rank::world]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    every = [None] * world
    dist.all_gather_object(every, [g.tolist() for g in grads])
    single = build_model(False)
    single.load_state_dict(model.state_dict())
    nn.functional.mse_loss(single(x[: (x.shape[0] // world) * world]),
                           y[: (x.shape[0] // world) * world]).backward()
    averaged = all(torch.allclose(g, s.grad, rtol=1e-9, atol=1e-12)
                   for g, s in zip(grads, single.parameters(), strict=True))
    return {"same_on_every_rank": all(e == every[0] for e in every), "averaged": averaged,
            "stepped_in_backward": int(opt.state[model[0].weight]["step"]) == 2}


def worker(rank: int, world: int, port: int, cases: list[Case], out: str) -> None:
    """Run every case (and the DCP save of ``out/dcp_*``) on this rank."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for case in cases:
            if case.mode == "dcp":
                directory = os.path.join(out, case.name)
                dcp_save(case, rank, world, directory, STEPS // 2)
                if case.big:  # 8-bit: the same world size loads it back
                    result = dcp_continue(case, rank, world, directory, STEPS // 2, True)
                    if rank == 0:
                        torch.save(result, os.path.join(out, case.name + ".pt"))
                continue
            result = run_case(case, rank, world)
            if rank == 0:
                torch.save(result, os.path.join(out, case.name + ".pt"))
        messages = refusals(rank, world)
        work = refresh_work(rank, world)
        work["reattach"] = reattach(rank, world)
        if rank == 0:
            torch.save(messages, os.path.join(out, "refusals.pt"))
            torch.save(work, os.path.join(out, "refresh_work.pt"))
    finally:
        dist.destroy_process_group()
