"""What a steady step costs besides its arithmetic: tensor ops dispatched per parameter
(counted with a TorchDispatchMode) and host time per parameter, on LLaMA-7B's parameter
layout (32 blocks of q, k, v, o, gate, up, down and two norms) at small shapes (hidden 64,
intermediate 172, rank 16), where the time is the host's: dispatch and Python.

GaLoreAdamW with each implementation against torch.optim.AdamW (single-tensor and foreach)
on the same parameters; medians of repetitions interleaved in a shuffled order.

    python benchmarks/step_overhead.py            # the README's figures
    python benchmarks/step_overhead.py --smoke    # 2 blocks, a few repetitions (CI)
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _results import results_path, write_csv
from torch.utils._python_dispatch import TorchDispatchMode

import subspace_optim as so


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not str(func).startswith("profiler."):  # torch's step-profiling marks
            self.count += 1
        return func(*args, **(kwargs or {}))


def layout(blocks: int, hidden: int = 64, intermediate: int = 172):
    torch.manual_seed(0)
    matrices, norms = [], []
    for _ in range(blocks):
        for shape in [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + \
                [(hidden, intermediate)]:
            matrices.append(torch.nn.Parameter(torch.randn(shape)))
        norms += [torch.nn.Parameter(torch.ones(hidden)) for _ in range(2)]
    for p in matrices + norms:
        p.grad = torch.randn_like(p)
    return matrices, norms


def candidates(blocks: int) -> dict[str, tuple[torch.optim.Optimizer, int]]:
    out = {}
    for impl, flags in (("foreach", {}), ("reference", {"foreach": False}),
                        ("fused (PyTorch ops)", {"fused": True})):
        matrices, norms = layout(blocks)
        opt = so.GaLoreAdamW([{"params": norms},
                              {"params": matrices, "rank": 16, "update_proj_gap": 10**6}],
                             **flags)
        out[f"GaLoreAdamW {impl}"] = (opt, len(matrices) + len(norms))
    for foreach in (False, True):
        matrices, norms = layout(blocks)
        out[f"torch.optim.AdamW foreach={foreach}"] = (
            torch.optim.AdamW(matrices + norms, foreach=foreach), len(matrices) + len(norms))
    return out


def measure(blocks: int, repeats: int) -> list[dict]:
    opts = candidates(blocks)
    ops = {}
    for name, (opt, count) in opts.items():
        opt.step()  # the refresh (SVDs) and the moments' creation, outside the measurement
        counter = OpCounter()
        with counter:
            opt.step()
        ops[name] = counter.count / count
    times = {name: [] for name in opts}
    order = random.Random(0)
    for _ in range(repeats):  # interleaved, in a new order each round
        for name, (opt, _) in order.sample(list(opts.items()), len(opts)):
            start = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torch.optim.AdamW foreach=False"])
    rows = []
    for name, (_, count) in opts.items():
        median = statistics.median(times[name])
        rows.append({"step": name, "ops_per_param": round(ops[name], 2),
                     "host_us_per_param": round(median / count * 1e6, 1),
                     "vs_torch_single_tensor": round(median / base, 3), "params": count,
                     "repeats": repeats})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None,
                        help="CSV to write (default benchmarks/results/step_overhead.csv; a "
                             "smoke run writes to the temporary directory)")
    args = parser.parse_args()
    rows = measure(2, 3) if args.smoke else measure(32, 31)
    where = write_csv(results_path(args.out, "benchmarks/results/step_overhead.csv",
                                   args.smoke), rows)
    print("| step | tensor ops / parameter | host time / parameter (us) | / torch single-tensor |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['ops_per_param']} | {r['host_us_per_param']} | "
              f"{r['vs_torch_single_tensor']} |")
    print(f"\n{where}")


if __name__ == "__main__":
    main()
