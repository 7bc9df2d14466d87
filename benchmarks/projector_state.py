"""Bytes of projector state per method for one 2048 x 512 weight at rank 128, counted with
optimizer_state_bytes after one step (the moments, identical for all, are reported apart).

    python benchmarks/projector_state.py
"""

from __future__ import annotations

import torch
from _results import results_path, write_csv

import subspace_optim as so

CLASSES = {"galore": so.GaLoreAdamW, "online_pca": so.OnlineSubspaceAdamW,
           "q_galore": so.QGaLoreAdamW, "grass": so.GrassAdamW, "dct": so.DCTAdamW,
           "flora": so.FloraAdamW}


def main() -> None:
    rows = []
    for name, cls in CLASSES.items():
        w = torch.nn.Parameter(torch.zeros(2048, 512))
        opt = cls([{"params": [w], "rank": 128}])
        w.grad = torch.randn(2048, 512, generator=torch.Generator().manual_seed(0))
        opt.step()
        state = opt.state[w]
        moments = sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
        rows.append({"projector": name, "projector_bytes": so.optimizer_state_bytes(opt) - moments,
                     "moment_bytes": moments})
    where = write_csv(results_path(None, "benchmarks/results/projector_state.csv", False), rows)
    print("| projector | projector state (bytes) | moments (bytes) |\n|---|---|---|")
    for r in rows:
        print(f"| `{r['projector']}` | {r['projector_bytes']:,} | {r['moment_bytes']:,} |")
    print(f"\n{where}")


if __name__ == "__main__":
    main()
