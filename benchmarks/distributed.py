"""Distributed steps on 2 gloo ranks (CPU, one thread per rank):

1. refresh strategies: time of a step that refreshes every matrix (GaLore, the first
   step), with every rank computing every SVD (``SUBSPACE_OPTIM_REFRESH=replicated``) or
   one owner per matrix and a broadcast (``owner``), P matrices of LLaMA-60M/130M MLP
   shapes, medians of interleaved repetitions;
2. bytes communicated per step and per refresh by the optimizer under FSDP2 and under
   layer-wise DDP, counted at the collectives (torch.distributed's Python functions) on
   the tiny LLaMA of the embedded default; DDP's own C++ reducer (ordinary DDP) is not
   seen there: it all-reduces every gradient once per step.

    python benchmarks/distributed.py            # writes benchmarks/results/distributed_*.csv
    python benchmarks/distributed.py --smoke    # tiny shapes, for CI
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _results import results_path, write_csv  # noqa: E402

import subspace_optim as so  # noqa: E402

# Where the optimizer communicates: torch.distributed's all-reduce (left-side projections,
# agreement on skip_nonfinite, the layer-wise DDP hook), the library's all-gather of rows
# (refreshes under FSDP2) and the owners' broadcasts.
GATHER_USERS = ("subspace_optim.distributed.fsdp", "subspace_optim.distributed.refresh")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refresh_time(shape: tuple[int, int], count: int, rank_r: int, strategy: str) -> float:
    """Seconds of one optimizer step in which every matrix refreshes."""
    os.environ["SUBSPACE_OPTIM_REFRESH"] = strategy
    g = torch.Generator().manual_seed(0)  # the same "reduced" gradient on every rank
    params = [torch.nn.Parameter(torch.zeros(shape)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(shape, generator=g)
    opt = so.GaLoreAdamW([{"params": params, "rank": rank_r}], lr=1e-3)
    dist.barrier()
    began = time.perf_counter()
    opt.step()
    dist.barrier()
    return time.perf_counter() - began


class _Meter:
    """Bytes this rank contributes to the optimizer's collectives while active: an
    all-reduce's tensor, an all-gather's local rows, a broadcast's payload at its source."""

    def __init__(self) -> None:
        self.bytes: Counter[str] = Counter()
        self._undo: list = []

    def _patch(self, owner, name: str, count) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            self.bytes[name] += count(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(owner, name, counted)
        self._undo.append((owner, name, original))

    def __enter__(self) -> _Meter:
        import importlib
        import pickle

        self._patch(dist, "all_reduce", lambda t, *a, **k: t.numel() * t.element_size())
        self._patch(dist, "broadcast_object_list", lambda objs, src=0, **k:
                    len(pickle.dumps(objs)) if dist.get_rank() == src else 0)
        for module in GATHER_USERS:
            self._patch(importlib.import_module(module), "gather_rows",
                        lambda t, *a, **k: t.numel() * t.element_size())
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def _tiny_model():
    from subspace_optim.train.config import load_config
    from subspace_optim.train.model import build_model

    cfg = load_config(None)
    torch.manual_seed(0)
    return cfg, build_model(cfg, cfg.data.vocab_size)


def _comm_bytes(mode: str, gap: int, steps: int) -> dict[str, int]:
    """Optimizer-side bytes per step (steady) and per refresh step on the tiny LLaMA."""
    from torch.nn.parallel import DistributedDataParallel

    from subspace_optim.train.model import build_optimizer
    from subspace_optim.train.parallel import Parallel, wrap

    cfg, model = _tiny_model()
    cfg.optimizer.group = {**cfg.optimizer.group, "update_proj_gap": gap}
    par = Parallel(mode="fsdp" if mode == "fsdp" else "ddp", rank=dist.get_rank(),
                   world=dist.get_world_size())
    if mode == "fsdp":
        forward, _ = wrap(par, model)
        stepper = None
    else:
        forward = DistributedDataParallel(model)
    opt = build_optimizer(model, cfg)
    if mode == "ddp-layerwise":
        stepper = so.step_in_backward(opt, ddp=forward)
    ids = torch.randint(0, cfg.data.vocab_size, (2, cfg.data.seq_len + 1),
                        generator=torch.Generator().manual_seed(dist.get_rank()))
    per_step = []
    for _ in range(steps):
        logits = forward(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        if mode == "fsdp":
            loss.backward()
            with _Meter() as meter:  # the optimizer's step alone
                opt.step()
        else:
            with _Meter() as meter:  # layer-wise: the steps run inside backward
                loss.backward()
                opt.step()
        opt.zero_grad()
        per_step.append(sum(meter.bytes.values()))
    if stepper is not None:
        stepper.remove()
    return {"refresh_step_bytes": per_step[0], "steady_step_bytes": per_step[1]}


def _worker(rank: int, world: int, port: int, smoke: bool, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    rows = []
    shapes = [(64, 96)] if smoke else [(512, 1376), (768, 2048)]
    counts = [2] if smoke else [4, 8]
    repeats = 1 if smoke else 5
    for shape in shapes:
        for count in counts:
            times = {"replicated": [], "owner": []}
            for _ in range(repeats):  # interleaved
                for strategy in times:
                    times[strategy].append(_refresh_time(shape, count, 16 if smoke else 128,
                                                         strategy))
            rows.append({"kind": "refresh", "shape": f"{shape[0]}x{shape[1]}",
                         "matrices": count, "world": world,
                         "replicated_s": statistics.median(times["replicated"]),
                         "owner_s": statistics.median(times["owner"])})
    if not smoke:
        for mode in ("fsdp", "ddp-layerwise"):
            rows.append({"kind": "bytes", "mode": mode, "world": world,
                         **_comm_bytes(mode, gap=1000, steps=2)})
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def llama_7b_figures(world: int = 8, rank: int = 1024) -> dict[str, float]:
    """The README's computed LLaMA-7B figures (GiB; fp32 gradients and states, GaLore's
    side rule: m >= n projects on the right, moments m x r sharded by rows; else on the left,
    moments r x n replicated, one r x n all-reduce per step)."""
    h, f, layers = 4096, 11008, 32
    sharded = replicated = bases = reduced = gathered = 0
    for m, n in [(h, h)] * 4 + [(f, h)] * 2 + [(h, f)]:
        if m >= n:
            sharded += 2 * m * rank * 4
            bases += rank * n * 4
        else:
            replicated += 2 * rank * n * 4
            bases += m * rank * 4
            reduced += rank * n * 4
        gathered += m * n * 4
    gib = 2**30 / layers
    out = {"left_all_reduce_per_step": reduced / gib, "refresh_gathered": gathered / gib,
           "bases": bases / gib, "sharded_moments": sharded / gib,
           "replicated_moments": replicated / gib}
    for n_ranks in (1, 2, world):
        out[f"state_per_rank_{n_ranks}"] = (sharded / n_ranks + replicated + bases) / gib
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.pt")
        mp.spawn(_worker, args=(2, _port(), args.smoke, out), nprocs=2)
        rows = torch.load(out, weights_only=True)
    refresh = [r for r in rows if r["kind"] == "refresh"]
    for r in refresh:
        r["owner_speedup"] = r["replicated_s"] / r["owner_s"]
    print("| matrix | matrices | ranks | replicated (s) | owner + broadcast (s) | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in refresh:
        print(f"| {r['shape']} | {r['matrices']} | {r['world']} | {r['replicated_s']:.3f} | "
              f"{r['owner_s']:.3f} | {r['owner_speedup']:.2f}x |")
    if args.smoke:
        return
    print(write_csv(results_path(None, "benchmarks/results/distributed_refresh.csv", False),
                    refresh))
    comm = [r for r in rows if r["kind"] == "bytes"]
    print("\n| mode | optimizer bytes per steady step (per rank) | per refresh step |")
    print("|---|---|---|")
    for r in comm:
        print(f"| {r['mode']} | {r['steady_step_bytes']:,} | {r['refresh_step_bytes']:,} |")
    print(write_csv(results_path(None, "benchmarks/results/distributed_comm.csv", False), comm))
    print("\nLLaMA-7B, rank 1024, computed from the shapes (GiB):")
    for key, value in llama_7b_figures().items():
        print(f"  {key}: {value:.3f}")


if __name__ == "__main__":
    main()
