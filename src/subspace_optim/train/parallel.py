"""``training.parallel``: one process, DDP or FSDP2, under ``torchrun``.

Every rank builds the same model from the same seed and takes its slice of each global
batch (``training.batch_size`` sequences, split evenly), so a run on N ranks computes the
gradient of the same global batch as one process. Only rank 0 writes metrics, the config,
plots and the progress bar; checkpoints are written by every rank through
``torch.distributed.checkpoint`` (``train.dist_checkpoint``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, RunConfig

MODES = ("none", "ddp", "fsdp")
LAUNCH = "torchrun --nproc_per_node N -m subspace_optim train CONFIG --set training.parallel={}"


@dataclass(frozen=True)
class Parallel:
    mode: str
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"


def _launched_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(cfg: RunConfig) -> Parallel:
    """The process group of this run (initialised here when needed); refuses a run whose
    settings cannot be honoured with the given mode."""
    t = cfg.training
    mode = t.parallel
    if mode not in MODES:
        raise ConfigError(f"training.parallel must be one of {MODES}, got {mode!r}")
    if mode == "none":
        if _launched_world() > 1:
            raise ConfigError(
                f"launched with {_launched_world()} processes but training.parallel=none: every "
                "process would train its own copy; set training.parallel=ddp or fsdp")
        return Parallel("none")
    if t.int8_weights:
        raise ConfigError(f"training.int8_weights=true with training.parallel={mode}: INT8 "
                          "weights keep their gradients outside .grad, which DDP and FSDP2 "
                          "do not reduce")
    if mode == "fsdp" and t.layerwise:
        raise ConfigError("training.layerwise=true with training.parallel=fsdp: FSDP2 "
                          "reduce-scatters gradients after backward, so no per-layer hook "
                          "sees a reduced gradient; use training.parallel=ddp for layer-wise "
                          "updates, or layerwise=false (FSDP2 already frees gradients)")
    if "RANK" not in os.environ and not dist.is_initialized():
        raise ConfigError(f"training.parallel={mode} needs a torchrun launch: "
                          + LAUNCH.format(mode))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and t.device in ("auto", "cuda")
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    if t.batch_size % world:
        raise ConfigError(f"training.batch_size={t.batch_size} does not split evenly over "
                          f"{world} ranks")
    return Parallel(mode, rank, world, int(os.environ.get("LOCAL_RANK", rank)))


def device(par: Parallel, chosen: torch.device) -> torch.device:
    """Each rank's own GPU (``LOCAL_RANK``) when the run is on CUDA."""
    if par.distributed and chosen.type == "cuda":
        torch.cuda.set_device(par.local_rank)
        return torch.device("cuda", par.local_rank)
    return chosen


def local_batch(par: Parallel, batch: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch."""
    if not par.distributed:
        return batch
    size = batch.shape[0] // par.world
    return batch[par.rank * size:(par.rank + 1) * size]


def wrap(par: Parallel, model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """``(model to call, DDP wrapper or None)``. FSDP2 shards each decoder layer and the
    root, in place (the optimizer must then be built on the sharded parameters)."""
    if par.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [par.local_rank] if next(model.parameters()).is_cuda else None
        ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
        return ddp, ddp
    if par.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
    return model, None


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def mean_over_ranks(par: Parallel, value: float) -> float:
    """The average of a per-rank number (a loss of equal-sized slices: the global mean)."""
    if not par.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / par.world


def any_rank(par: Parallel, flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (a decision every rank must take alike)."""
    if not par.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_main(par: Parallel, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (e.g. a run directory named by the clock)."""
    if not par.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(par: Parallel) -> None:
    if par.distributed:
        dist.barrier()


def full_norm(norm: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient norm that FSDP2's clipping returns as a DTensor, as a plain tensor."""
    if norm is not None and hasattr(norm, "full_tensor"):
        return norm.full_tensor()
    return norm


def teardown(par: Parallel) -> None:
    if par.distributed and dist.is_initialized():
        dist.destroy_process_group()
