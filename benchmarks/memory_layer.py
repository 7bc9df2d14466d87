"""Bytes held for one LLaMA-7B MLP layer (4096 x 11008, bf16) by each method, counted from
the tensors after one optimizer step: weight, gradient, optimizer states, projector.

    python benchmarks/memory_layer.py [--rank 1024] [--out benchmarks/results/memory_layer.csv]

Writes a CSV (with the machine, commit and date) and prints a Markdown table. About 9
minutes on a 2-core CPU: three of the methods take the SVD of a 4096 x 11008 gradient.
"""

from __future__ import annotations

import argparse

import torch
from _results import progress, results_path, write_csv

import subspace_optim as so
from subspace_optim.nn import Int8Linear

SHAPE = (4096, 11008)


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _state_split(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(moment bytes, projector bytes): projector state is every ``proj_*`` key."""
    moments = projector = 0
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                if key.startswith("proj_"):
                    projector += _bytes(value)
                else:
                    moments += _bytes(value)
    return moments, projector


def measure(name: str, rank: int) -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False, dtype=torch.bfloat16)
    grad = torch.randn(SHAPE, dtype=torch.bfloat16)
    group = {"rank": rank, "update_proj_gap": 200, "scale": 0.25}
    if name == "Q-GaLore (INT8 weight)":
        layer = Int8Linear.from_linear(linear)
        layer.weight_grad = grad
        opt = so.QGaLoreAdamW8bit([{"params": [layer.weight], **group}])
        weight_bytes = sum(_bytes(t) for t in (layer.weight, layer.weight_scales,
                                               layer.weight_zeros))
        grad_bytes = _bytes(layer.weight_grad)
    else:
        param = linear.weight
        param.grad = grad
        if name == "AdamW (torch)":
            opt = torch.optim.AdamW([param])
        elif name == "AdamW8bit (bitsandbytes)":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit([param])
        elif name == "GaLore":
            opt = so.GaLoreAdamW([{"params": [param], **group}])
        elif name == "GaLore 8-bit":
            opt = so.GaLoreAdamW8bit([{"params": [param], **group}])
        else:
            raise ValueError(name)
        weight_bytes, grad_bytes = _bytes(param), _bytes(param.grad)
    opt.step()
    moments, projector = _state_split(opt)
    return {"method": name, "weight": weight_bytes, "gradient": grad_bytes, "states": moments,
            "projector": projector, "total": weight_bytes + grad_bytes + moments + projector}


METHODS = ["AdamW (torch)", "AdamW8bit (bitsandbytes)", "GaLore", "GaLore 8-bit",
           "Q-GaLore (INT8 weight)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=1024)
    parser.add_argument("--out", default=None,
                        help="CSV to write (default benchmarks/results/memory_layer.csv)")
    args = parser.parse_args()
    out = results_path(args.out, "benchmarks/results/memory_layer.csv", False)
    print(f"{len(METHODS)} methods, one optimizer step each on a 4096 x 11008 bf16 layer: about "
          "9 minutes on a 2-core CPU (three of them take the SVD of the whole gradient)",
          flush=True)
    rows = [measure(name, args.rank) for name in progress(METHODS, "memory_layer", "method")]
    where = write_csv(out, [{**row, "rank": args.rank} for row in rows])
    mib = 2**20
    print(f"| method (4096 x 11008, bf16, rank {args.rank}) | weight | gradient | states "
          "| projector | total (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['weight'] / mib:.1f} | {r['gradient'] / mib:.1f} | "
              f"{r['states'] / mib:.1f} | {r['projector'] / mib:.2f} | {r['total'] / mib:.1f} |")
    print(f"\n{where}")


if __name__ == "__main__":
    main()
