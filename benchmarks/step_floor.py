"""The steady GaLore step against its floor: the two matrix products a projected step cannot
avoid, projecting the gradient (``G B^T`` or ``B^T G``) and back-projecting the update into
the weight (``W.addmm_(N, B, beta=1 - lr wd)``), timed on the same shapes in the same run.

LLaMA-130M's block shapes (q, k, v, o 768 x 768; gate, up 2048 x 768; down 768 x 2048) at
rank 256, fp32, a steady step (no refresh), lr 1e-3, GaLoreAdamW's defaults (no weight
decay, as galore-torch). With decay, it is folded into the second product's ``beta``, and a
BLAS applies a ``beta`` other than 1 as a pass over the weight of its own (MKL does): that
step is measured against a floor with the same ``beta``. Every round runs every candidate
once, in a new random order; a ratio is the median over rounds of the candidate's time over
its floor's time in the same round (quartiles beside it), which cancels the slow stretches
of a shared machine that a ratio of two medians keeps.

    python benchmarks/step_floor.py            # the README's figures, and where the time goes
    python benchmarks/step_floor.py --smoke    # tiny shapes, a few repetitions (CI)
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from _results import interleaved_times, paired_ratio, results_path, write_csv

import subspace_optim as so

BLOCK_130M = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]
SMOKE = [(48, 48)] * 4 + [(96, 48)] * 2 + [(48, 96)]
LR, WEIGHT_DECAY = 1e-3, 1e-2
FLOOR, DECAY_FLOOR = "two-GEMM floor", "two-GEMM floor, beta = 1 - lr wd"


def _params(shapes):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def _floor(params, rank, beta: float = 1.0):
    """The two GEMMs per matrix, on bases of the step's shapes."""
    gen = torch.Generator().manual_seed(1)
    bases = []
    for p in params:
        m, n = p.shape
        right = m >= n
        bases.append((right, torch.randn((rank, n) if right else (m, rank), generator=gen)))

    def run():
        for p, (right, b) in zip(params, bases, strict=True):
            if right:
                low = p.grad @ b.T
                p.data.addmm_(low, b, beta=beta, alpha=-1e-7)
            else:
                low = b.T @ p.grad
                p.data.addmm_(b, low, beta=beta, alpha=-1e-7)
    return run


def _ours(shapes, rank, weight_decay=0.0, **flags):
    params = _params(shapes)
    opt = so.GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 10**6}],
                         lr=LR, weight_decay=weight_decay, **flags)
    opt.step()  # the refresh (SVDs), outside the timing
    return opt.step


def _galore_torch(shapes, rank):
    try:
        import galore_torch
    except ImportError:
        return None
    params = _params(shapes)
    theirs = galore_torch.GaLoreAdamW([{"params": params, "rank": rank,
                                        "update_proj_gap": 10**6, "scale": 0.25,
                                        "proj_type": "std"}], lr=LR,
                                      no_deprecation_warning=True)
    theirs.step()
    return theirs.step


DECAYED = f"GaLoreAdamW foreach, weight_decay {WEIGHT_DECAY}"


def candidates(shapes, rank: int) -> tuple[dict, dict]:
    """The timed callables, and the floor each is measured against."""
    beta = 1 - LR * WEIGHT_DECAY
    timed = {FLOOR: _floor(_params(shapes), rank),
             DECAY_FLOOR: _floor(_params(shapes), rank, beta=beta),
             "GaLoreAdamW foreach": _ours(shapes, rank),
             DECAYED: _ours(shapes, rank, weight_decay=WEIGHT_DECAY),
             "GaLoreAdamW reference": _ours(shapes, rank, foreach=False),
             "GaLoreAdamW fused (PyTorch ops)": _ours(shapes, rank, fused=True)}
    theirs = _galore_torch(shapes, rank)
    if theirs is not None:
        timed["galore_torch.GaLoreAdamW"] = theirs
    floors = {name: DECAY_FLOOR if name in (DECAY_FLOOR, DECAYED) else FLOOR
              for name in timed}
    return timed, floors


def measure(shapes, rank: int, repeats: int) -> list[dict]:
    timed, floors = candidates(shapes, rank)
    for fn in timed.values():  # warm: first-touch allocations, BLAS buffers
        fn()
    times = interleaved_times(timed, repeats)
    peer = times.get("galore_torch.GaLoreAdamW")
    rows = []
    for name, t in times.items():
        ratio, q25, q75 = paired_ratio(t, times[floors[name]])
        rows.append({
            "step": name, "median_ms": round(statistics.median(t) * 1e3, 3),
            "floor": floors[name], "vs_floor": round(ratio, 3),
            "vs_floor_q25": round(q25, 3), "vs_floor_q75": round(q75, 3),
            "vs_beta1_floor": round(paired_ratio(t, times[FLOOR])[0], 3),
            "vs_galore_torch": round(paired_ratio(t, peer)[0], 3) if peer else "",
            "rank": rank, "shapes": "LLaMA-130M block" if shapes is BLOCK_130M else "smoke",
            "lr": LR, "repeats": repeats})
    return rows


def _profiled_parts(fn, steps: int, label: str) -> tuple[dict, float]:
    """Self CPU time (us, summed over ``steps`` calls of ``fn``) of the GEMMs, the fused
    moment update and the other tensor ops, and the calls' total time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function(label):
                fn()
    parts = {"projection and back-projection GEMMs": 0.0, "fused moment update": 0.0,
             "other tensor ops": 0.0}
    total = 0.0
    for event in prof.key_averages():
        if event.key == label:
            total += event.cpu_time_total
        elif event.key in ("aten::mm", "aten::addmm_"):
            parts["projection and back-projection GEMMs"] += event.self_cpu_time_total
        elif event.key == "aten::_fused_adamw_":
            parts["fused moment update"] += event.self_cpu_time_total
        elif event.key.startswith("aten::"):
            parts["other tensor ops"] += event.self_cpu_time_total
    return parts, total


def breakdown(shapes, rank: int, steps: int) -> list[dict]:
    """Where the default foreach step's time goes, from torch's profiler over ``steps``
    steady steps (means per step): the two GEMMs, the fused moment update, the other tensor
    ops, and the rest, time between ops: host-side Python, each op's own entry and exit,
    and the profiler's cost per op. The floor's loop, profiled the same way, shows how
    much of that rest any loop of these GEMMs pays."""
    rows = []
    for name, fn in (("GaLoreAdamW foreach", _ours(shapes, rank)),
                     (FLOOR, _floor(_params(shapes), rank))):
        parts, total = _profiled_parts(fn, steps, f"timed: {name}")
        parts["between ops (host Python, op entry and exit, profiler)"] = \
            total - sum(parts.values())
        rows += [{"timed": name, "component": part, "ms_per_step": round(us / steps / 1e3, 3),
                  "share_of_its_time": round(us / total, 4), "steps": steps}
                 for part, us in parts.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 3 repetitions")
    parser.add_argument("--repeats", type=int, default=151)
    parser.add_argument("--out", default=None,
                        help="CSV to write (default benchmarks/results/step_floor.csv; a "
                             "smoke run writes to the temporary directory)")
    parser.add_argument("--breakdown-out", default=None,
                        help="default: beside --out, as <name>_breakdown.csv")
    args = parser.parse_args()
    shapes, rank, repeats = (SMOKE, 16, 3) if args.smoke else (BLOCK_130M, 256, args.repeats)
    rows = measure(shapes, rank, repeats)
    args.out = results_path(args.out, "benchmarks/results/step_floor.csv", args.smoke)
    where = write_csv(args.out, rows)
    parts = breakdown(shapes, rank, 3 if args.smoke else 31)
    out = Path(args.out)
    write_csv(args.breakdown_out or str(out.with_name(f"{out.stem}_breakdown.csv")), parts)
    print("| step | median (ms) | / its floor (quartiles) | / beta = 1 floor | / galore-torch |"
          "\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['median_ms']} | {r['vs_floor']} ({r['vs_floor_q25']}-"
              f"{r['vs_floor_q75']}) | {r['vs_beta1_floor']} | {r['vs_galore_torch']} |")
    print("\n| where the time goes | component | ms / call | share |\n|---|---|---|---|")
    for r in parts:
        print(f"| {r['timed']} | {r['component']} | {r['ms_per_step']} | "
              f"{r['share_of_its_time']:.1%} |")
    print(f"\n{where}")


if __name__ == "__main__":
    main()
