"""Checkpoints of runs on several ranks: model and optimizer through
``torch.distributed.checkpoint`` (each rank writes its shards; a run with another number of
ranks reads them resharded), the rest (step, scheduler, RNG, history) in the atomic
single-file checkpoint of ``train.checkpoint``, written by rank 0 last.

A checkpoint counts once its record names it: the DCP folder ``step_N.dcp`` is complete
(DCP writes its ``.metadata`` after every shard) before rank 0 writes ``step_N.pt`` and its
record, so a crash in between leaves the previous checkpoint in force.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..optim import checkpoint as optim_checkpoint
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .parallel import Parallel, barrier


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(directory: Path, step: int, payload: dict[str, Any], model: torch.nn.Module,
         optimizer: torch.optim.Optimizer, par: Parallel) -> None:
    import torch.distributed.checkpoint as dcp

    name = f"step_{step:08d}.dcp"
    target = directory / name
    if par.main:
        directory.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a write of this step that never got its record
            shutil.rmtree(target)
    barrier(par)
    dcp.save(_states(model, optimizer), checkpoint_id=str(target))
    barrier(par)
    if par.main:
        # What the DCP state dict of an optimizer leaves out: this library's marker (with
        # layer-wise mode's clipping reference).
        extra = optimizer.state_dict().get(optim_checkpoint.EXTRA_KEY)
        save_checkpoint(directory, step, {**payload, "dcp": name, "optimizer_extra": extra})
        kept = {p.with_suffix(".dcp").name for p in directory.glob("step_*.pt")}
        for old in directory.glob("step_*.dcp"):
            if old.name not in kept:
                shutil.rmtree(old, ignore_errors=True)
    barrier(par)


def load(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
         ) -> dict[str, Any]:
    """Load model and optimizer (resharded to this run's ranks); returns the rest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    payload = load_checkpoint(directory)
    if "dcp" not in payload:
        raise CheckpointError(f"{directory} was written by a run with training.parallel=none; "
                              "resume it the same way")
    folder = directory / payload["dcp"]
    if not (folder / ".metadata").exists():
        raise CheckpointError(f"{folder} is incomplete (no .metadata)")
    states = _states(model, optimizer)
    dcp.load(states, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=states["model"],
                   optim_state_dict=states["optim"])
    extra = payload.get("optimizer_extra") or {}
    if hasattr(optimizer, "_pending_clip_norm"):
        optimizer._pending_clip_norm = extra.get("clip_norm")
    return payload


def model_state(directory: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The latest checkpoint's parameters, loaded into ``model`` in this one process."""
    import torch.distributed.checkpoint as dcp

    payload = load_checkpoint(directory)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(directory / payload["dcp"]), no_dist=True)
    model.load_state_dict(state["model"])
    return state["model"]
