"""The Triton kernels against their ops' PyTorch implementations, and the whole fused
projected step against the foreach step, on LLaMA-1B and LLaMA-7B layer shapes.

For each layer shape, rank (128, 256, 1024) and weight dtype (fp32, bf16):

* every kernel-backed op, PyTorch implementation and Triton kernel on the same inputs
  (the down-projection also as the kernels' own GEMM against cuBLAS, the choice the
  fused step makes by keeping cuBLAS there);
* one steady GaLoreAdamW step (no refresh) on a weight of that shape: ``foreach`` with
  ``SUBSPACE_OPTIM_KERNELS=torch`` against ``fused=True`` with ``SUBSPACE_OPTIM_KERNELS=triton``.

Times are medians of repetitions interleaved in a shuffled order (CUDA events on a GPU),
ratios are PyTorch / Triton (above 1: the kernel is faster) in the same run, and peak memory
is the allocator's peak during the call above what was allocated before it (GPU only).

    python benchmarks/kernel_speed.py            # a CUDA GPU: the README's figures
    python benchmarks/kernel_speed.py --smoke    # tiny shapes in Triton's interpreter (CI, CPU)
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time
from collections.abc import Callable

import torch
from _results import progress, results_path, write_csv

# (model, layer, out_features, in_features), as in configs/model/llama_{1b,7b}.yaml.
SHAPES = [("LLaMA-1B", "attention", 2048, 2048), ("LLaMA-1B", "mlp up", 5461, 2048),
          ("LLaMA-1B", "mlp down", 2048, 5461), ("LLaMA-7B", "attention", 4096, 4096),
          ("LLaMA-7B", "mlp up", 11008, 4096), ("LLaMA-7B", "mlp down", 4096, 11008)]
RANKS = (128, 256, 1024)
DTYPES = (torch.float32, torch.bfloat16)
SMOKE_SHAPES = [("smoke", "wide", 48, 80), ("smoke", "tall", 80, 48)]
SMOKE_RANKS = (16,)


class Timer:
    """Wall time of a call on the device of the benchmark (CUDA events on a GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | str:
    """The allocator's peak during ``fn`` above what was allocated before it; '' on CPU."""
    if device.type != "cuda":
        return ""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def compare(candidates: dict[str, Callable[[], object]], timer: Timer, repeats: int,
            warmup: int) -> dict[str, float]:
    for fn in candidates.values():
        for _ in range(warmup):  # compiles and autotunes the kernels outside the timing
            fn()
    times = {name: [] for name in candidates}
    order = random.Random(0)
    for _ in range(repeats):
        for name, fn in order.sample(list(candidates.items()), len(candidates)):
            times[name].append(timer(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def _op_cases(m: int, n: int, rank: int, dtype: torch.dtype, device: torch.device):
    """``(op, arguments, indices of mutated arguments)`` per kernel-backed op, on one layer,
    with the projection on the side GaLore picks (right when m >= n)."""
    from subspace_optim.quant import quantize_groupwise

    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, kind=dtype):
        return (torch.randn(shape, generator=gen, device=device) * scale).to(kind)

    right = m >= n
    low_shape = (m, rank) if right else (rank, n)
    basis_shape = (rank, n) if right else (m, rank)
    weight, grad, low = rand(m, n, scale=0.02), rand(m, n), rand(*low_shape)
    basis = rand(*basis_shape, scale=1 / math.sqrt(max(m, n)))
    moments = (rand(*low_shape, scale=0.1, kind=torch.float32),
               rand(*low_shape, kind=torch.float32).abs() * 0.01)
    packed = quantize_groupwise(rand(*basis_shape, kind=torch.float32), 4, 256)
    seed = torch.tensor(2**40 + 17)
    k = rank
    indices = torch.randperm(n if right else m, generator=gen, device=device)[:k].sort().values
    scales = torch.ones(k, device=device)
    cases = [
        ("projected_adamw_update", [weight, low.float(), basis, *moments, 3, 1e-3, 0.9, 0.999, 1e-8,
                                    0.0, 0.25, right, True, True, False], (0, 3, 4)),
        ("int4_project", [grad, *packed, rank, right, 4, 256], ()),
        ("int4_project_back_", [weight, low, *packed, right, 4, 256, dtype, -1e-3, 1.0], (0,)),
        ("flora_project", [grad, seed, rank, right], ()),
        ("flora_project_back_", [weight, low, seed, right, -1e-3, 1.0], (0,)),
        ("grass_gather", [grad, indices, scales, right], ()),
        ("grass_scatter_update_", [weight, low, indices, scales, right, -1e-3, 1.0], (0,)),
        ("int8_sr_store_", [torch.empty(m * n, dtype=torch.uint8, device=device),
                            torch.empty(-(-m * n // 256), device=device),
                            torch.empty(-(-m * n // 256), dtype=torch.uint8, device=device),
                            weight, 7, 3, 256], (0, 1, 2)),
    ]
    from subspace_optim.quant.blockwise import quantize_blockwise_8bit

    try:
        eight = [*quantize_blockwise_8bit(moments[0], True),
                 *quantize_blockwise_8bit(moments[1], False)]
    except ImportError:  # bitsandbytes (its dynamic map) is missing: 8-bit states not timed
        return cases, (grad, basis, right)
    cases.append(("blockwise8_adamw_update", [low.float(), *eight, 3, 0.9, 0.999, 1e-8,
                                              True, True, False], (1, 2, 3, 4)))
    return cases, (grad, basis, right)


def _own_copy(args, mutated):
    """The arguments with private copies of those the op mutates, so that the PyTorch and
    the Triton implementation do not update each other's tensors (each drifts a little
    over the repetitions, which changes no timing)."""
    return [a.clone() if i in mutated else a for i, a in enumerate(args)]


def kernel_rows(m, n, rank, dtype, device, timer, repeats, warmup) -> list[dict]:
    from subspace_optim.kernels import gemm, registry  # noqa: F401 (registers the kernels)

    from subspace_optim import ops

    cases, (grad, basis, right) = _op_cases(m, n, rank, dtype, device)
    rows = []
    for name, args, mutated in cases:
        torch_args, triton_args = _own_copy(args, mutated), _own_copy(args, mutated)
        impls = {"torch": lambda a=torch_args, n_=name: ops._TORCH[n_](*a),
                 "triton": lambda a=triton_args, n_=name: ops._TRITON[n_](*a)}
        medians = compare(impls, timer, repeats, warmup)
        rows.append({"op": name, "torch_ms": medians["torch"] * 1e3,
                     "triton_ms": medians["triton"] * 1e3,
                     "speedup": medians["torch"] / medians["triton"],
                     "torch_peak_bytes": peak_bytes(impls["torch"], device),
                     "triton_peak_bytes": peak_bytes(impls["triton"], device)})
    # The down-projection: cuBLAS against the kernels' GEMM on the same operands.
    mm, kk = grad.shape
    if right:
        out = torch.empty((mm, rank), device=device, dtype=grad.dtype)
        def ours():
            return gemm.matmul(gemm.dense(grad), gemm.dense(basis.T), mm, rank, kk, out)
        def cublas():
            return grad @ basis.T
    else:
        out = torch.empty((rank, kk), device=device, dtype=grad.dtype)
        def ours():
            return gemm.matmul(gemm.dense(basis.T), gemm.dense(grad), rank, kk, mm, out)
        def cublas():
            return basis.T @ grad
    medians = compare({"torch": cublas, "triton": ours}, timer, repeats, warmup)
    rows.append({"op": "down-projection GEMM", "torch_ms": medians["torch"] * 1e3,
                 "triton_ms": medians["triton"] * 1e3,
                 "speedup": medians["torch"] / medians["triton"],
                 "torch_peak_bytes": peak_bytes(cublas, device),
                 "triton_peak_bytes": peak_bytes(ours, device)})
    return rows


def step_row(m, n, rank, dtype, device, timer, repeats, warmup) -> dict:
    """One steady GaLoreAdamW step, foreach (PyTorch ops) against fused (Triton)."""
    import subspace_optim as so

    def build(setting, flags):
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.nn.Parameter((torch.randn((m, n), generator=gen, device=device) * 0.02)
                               .to(dtype))
        w.grad = torch.randn((m, n), generator=gen, device=device).to(dtype)
        opt = so.GaLoreAdamW([{"params": [w], "rank": rank, "update_proj_gap": 10**9}],
                             lr=1e-6, **flags)
        os.environ["SUBSPACE_OPTIM_KERNELS"] = setting
        opt.step()  # the refresh (one SVD), outside the timing

        def run():
            os.environ["SUBSPACE_OPTIM_KERNELS"] = setting
            opt.step()
        return run, w

    foreach, w = build("torch", {})
    fused, _ = build("triton", {"fused": True})
    medians = compare({"foreach": foreach, "fused": fused}, timer, repeats, warmup)
    weight_bytes = w.numel() * w.element_size()
    return {"op": "GaLoreAdamW step", "torch_ms": medians["foreach"] * 1e3,
            "triton_ms": medians["fused"] * 1e3,
            "speedup": medians["foreach"] / medians["fused"],
            "torch_peak_bytes": peak_bytes(foreach, device),
            "triton_peak_bytes": peak_bytes(fused, device), "weight_bytes": weight_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes in Triton's interpreter, 2 repetitions")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--models", default="LLaMA-1B,LLaMA-7B",
                        help="comma-separated subset of LLaMA-1B, LLaMA-7B")
    parser.add_argument("--out", default=None,
                        help="CSV to write (default benchmarks/results/kernels.csv; a smoke "
                             "run writes to the temporary directory)")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("the kernel benchmark needs a CUDA GPU; on a CPU run it with --smoke "
                     "(Triton's interpreter, tiny shapes: a check that it runs, not a timing)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the anchor's setting (TF32 on)
    models = set(args.models.split(","))
    shapes = SMOKE_SHAPES if args.smoke else [s for s in SHAPES if s[0] in models]
    ranks = SMOKE_RANKS if args.smoke else RANKS
    repeats, warmup = (2, 1) if args.smoke else (args.repeats, 3)
    timer = Timer(device)
    rows = []
    grid = [(s, r, d) for s in shapes for r in ranks for d in DTYPES if r < min(s[2], s[3])]
    for (model, layer, m, n), rank, dtype in progress(grid, "kernels"):
        where = {"model": model, "layer": layer, "shape": f"{m}x{n}", "rank": rank,
                 "dtype": str(dtype).removeprefix("torch.")}
        for row in kernel_rows(m, n, rank, dtype, device, timer, repeats, warmup):
            rows.append({**where, **row, "weight_bytes": m * n * dtype.itemsize})
        rows.append({**where, **step_row(m, n, rank, dtype, device, timer, repeats, warmup)})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        for key in ("torch_ms", "triton_ms", "speedup"):
            row[key] = round(row[key], 4)
        row["repeats"] = repeats
        row["interpreted"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    where = write_csv(results_path(args.out, "benchmarks/results/kernels.csv", args.smoke),
                      rows)
    print("| model | layer | rank | dtype | op | PyTorch (ms) | Triton (ms) | speed-up | "
          "peak PyTorch / Triton (MiB) |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peaks = ("" if r["torch_peak_bytes"] == "" else
                 f"{r['torch_peak_bytes'] / 2**20:.1f} / {r['triton_peak_bytes'] / 2**20:.1f}")
        print(f"| {r['model']} | {r['layer']} | {r['rank']} | {r['dtype']} | {r['op']} | "
              f"{r['torch_ms']} | {r['triton_ms']} | {r['speedup']} | {peaks} |")
    print(f"\n{where}")


if __name__ == "__main__":
    main()
