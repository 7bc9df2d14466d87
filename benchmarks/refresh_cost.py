"""The cost of one subspace refresh per projector, as a function of the matrix size, up to
LLaMA-7B's MLP matrix (4096 x 11008), at rank min(m, n) / 4, fp32, on this machine.

A refresh's cost is what a user pays at a refresh step: the median time of a step that
refreshes (``update_proj_gap=1``) minus the median time of a steady step (a gap longer than
the run), both of the same optimizer class on the same gradient, one after the other. Online
subspace descent learns its basis at every step instead (its "refresh" is part of each
step: the difference is then about zero, and its steady step carries the cost).

    python benchmarks/refresh_cost.py            # benchmarks/results/refresh_cost.csv
    python benchmarks/refresh_cost.py --smoke    # tiny shapes (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _results import results_path, write_csv  # noqa: E402

import subspace_optim as so  # noqa: E402

# name -> (class, extra group keys)
CLASSES = {"galore": (so.GaLoreAdamW, {}),
           "galore-randomized": (so.GaLoreAdamW, {"svd": "randomized"}),
           "dct": (so.DCTAdamW, {}), "online_pca": (so.OnlineSubspaceAdamW, {}),
           "flora": (so.FloraAdamW, {}), "grass": (so.GrassAdamW, {}),
           "q_galore": (so.QGaLoreAdamW, {}), "apollo": (so.ApolloAdamW, {}),
           "fira": (so.FiraAdamW, {})}
SIZES = [(512, 1376), (1024, 2736), (2048, 5461), (4096, 11008)]
SMOKE_SIZES = [(48, 96), (96, 200)]


def _step_time(cls, keys, shape, rank, gap, repeats) -> float:
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
    w.grad = torch.randn(shape, generator=gen)
    opt = cls([{"params": [w], "rank": rank, "update_proj_gap": gap, **keys}], lr=1e-6)
    opt.step()  # the first refresh and state creation, outside the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated projectors of "
                        + ", ".join(CLASSES))
    parser.add_argument("--sizes", default="", help="comma-separated MxN (default: all)")
    parser.add_argument("--out", default=None,
                        help="CSV to write (default benchmarks/results/refresh_cost.csv; "
                             "a smoke run writes to the temporary directory)")
    args = parser.parse_args()
    sizes = SMOKE_SIZES if args.smoke else SIZES
    if args.sizes:
        sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    names = [n for n in CLASSES if not args.only or n in args.only.split(",")]
    if not args.smoke:
        print(f"{len(sizes) * len(names)} refreshes to time; the full SVD of 4096 x 11008 "
              "alone takes about a minute per repeat on 2 CPU threads", flush=True)
    rows = []
    for m, n in sizes:
        rank = min(m, n) // 4
        repeats = 1 if m * n > 2048 * 5461 else 3
        for name in names:
            cls, keys = CLASSES[name]
            refreshing = _step_time(cls, keys, (m, n), rank, 1, repeats)
            steady = _step_time(cls, keys, (m, n), rank, 10**6, repeats)
            rows.append({"projector": name, "shape": f"{m}x{n}", "rank": rank,
                         "refresh_step_ms": round(refreshing * 1e3, 2),
                         "steady_step_ms": round(steady * 1e3, 2),
                         "refresh_ms": round((refreshing - steady) * 1e3, 2),
                         "repeats": repeats})
            print(f"{name:>10} {m}x{n} rank {rank}: refresh {rows[-1]['refresh_ms']} ms "
                  f"(steady step {rows[-1]['steady_step_ms']} ms)", flush=True)
    print(write_csv(results_path(args.out, "benchmarks/results/refresh_cost.csv", args.smoke),
                    rows))


if __name__ == "__main__":
    main()
