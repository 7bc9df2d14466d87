"""The steady GaLore step against its floor: the two matrix products a projected step cannot
avoid, projecting the gradient (``G B^T`` or ``B^T G``) and back-projecting the update into
the weight (``W.addmm_(N, B)``), timed on the same tensors in the same run.

LLaMA-130M's block shapes (q, k, v, o 768 x 768; gate, up 2048 x 768; down 768 x 2048) at
rank 256, fp32, a steady step (no refresh). Medians of repetitions interleaved in a shuffled
order; ratios to the floor and to galore-torch's ``GaLoreAdamW`` step on the same gradients.

    python benchmarks/step_floor.py            # the README's figures
    python benchmarks/step_floor.py --smoke    # tiny shapes, a few repetitions (CI)
"""

from __future__ import annotations

import argparse

import torch
from _results import interleaved_medians, write_csv

import subspace_optim as so

BLOCK_130M = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]
SMOKE = [(48, 48)] * 4 + [(96, 48)] * 2 + [(48, 96)]


def _params(shapes):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


def _floor(params, rank):
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
                p.data.addmm_(low, b, beta=1.0, alpha=-1e-7)
            else:
                low = b.T @ p.grad
                p.data.addmm_(b, low, beta=1.0, alpha=-1e-7)
    return run


def _optimizers(shapes, rank):
    out = {}
    for impl, flags in (("foreach", {}), ("reference", {"foreach": False}),
                        ("fused (PyTorch ops)", {"fused": True})):
        params = _params(shapes)
        opt = so.GaLoreAdamW([{"params": params, "rank": rank, "update_proj_gap": 10**6}],
                             lr=1e-7, **flags)
        opt.step()  # the refresh (SVDs), outside the timing
        out[f"GaLoreAdamW {impl}"] = opt.step
    try:
        import galore_torch
    except ImportError:
        return out
    params = _params(shapes)
    theirs = galore_torch.GaLoreAdamW([{"params": params, "rank": rank,
                                        "update_proj_gap": 10**6, "scale": 0.25,
                                        "proj_type": "std"}], lr=1e-7)
    theirs.step()
    out["galore_torch.GaLoreAdamW"] = theirs.step
    return out


def measure(shapes, rank: int, repeats: int) -> list[dict]:
    candidates = {"two-GEMM floor": _floor(_params(shapes), rank), **_optimizers(shapes, rank)}
    medians = interleaved_medians(candidates, repeats)
    floor = medians["two-GEMM floor"]
    peer = medians.get("galore_torch.GaLoreAdamW")
    return [{"step": name, "median_ms": round(m * 1e3, 3), "vs_floor": round(m / floor, 3),
             "vs_galore_torch": round(m / peer, 3) if peer else "",
             "rank": rank, "shapes": "LLaMA-130M block" if shapes is BLOCK_130M else "smoke",
             "repeats": repeats} for name, m in medians.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 3 repetitions")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--out", default="benchmarks/results/step_floor.csv")
    args = parser.parse_args()
    shapes, rank, repeats = (SMOKE, 16, 3) if args.smoke else (BLOCK_130M, 256, args.repeats)
    rows = measure(shapes, rank, repeats)
    where = write_csv(args.out, rows)
    print("| step | median (ms) | / two-GEMM floor | / galore-torch |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['median_ms']} | {r['vs_floor']} | {r['vs_galore_torch']} |")
    print(f"\n{where}")


if __name__ == "__main__":
    main()
