"""The memory planner against measurement: predicted and measured optimizer-state bytes
and peak memory of two real steps (``subspace_optim.train.planner.measure``: the CPU
allocator's record through the profiler, or CUDA's peak statistics), for the tiny and
LLaMA-60M configs on the CPU, and 60M, 350M and 1B on a GPU when there is one.

    python benchmarks/planner.py            # benchmarks/results/planner.csv
    python benchmarks/planner.py --smoke    # the tiny config alone (CI)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _results import results_path, write_csv  # noqa: E402

from subspace_optim.train.config import load_config  # noqa: E402
from subspace_optim.train.planner import measure, plan  # noqa: E402

CPU_CASES = {
    "tiny": [],
    "tiny, layer-wise": ["training.layerwise=true"],
    "tiny, activation checkpointing": ["training.activation_checkpointing=true"],
    "60M": ["model=llama_60m"],
    "60M, 8-bit states": ["model=llama_60m", "optimizer.name=GaLoreAdamW8bit"],
    "60M, Q-GaLore INT8 weights layer-wise": ["model=llama_60m",
                                              "optimizer.name=QGaLoreAdamW8bit",
                                              "training.int8_weights=true",
                                              "training.layerwise=true"],
}
GPU_CASES = {
    "60M": ["model=llama_60m", "training.dtype=bf16"],
    "350M": ["model=llama_350m", "training.dtype=bf16", "training.batch_size=8"],
    "1B, 8-bit layer-wise": ["model=llama_1b", "training.dtype=bf16", "training.batch_size=4",
                             "optimizer.name=GaLoreAdamW8bit", "training.layerwise=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default=None,
                        help="CSV of a full run (default benchmarks/results/planner_<device>"
                             ".csv; a smoke run writes to the temporary directory)")
    args = parser.parse_args()
    cases = {"tiny": []} if args.smoke else dict(CPU_CASES)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not args.smoke:
        cases = GPU_CASES
    rows = []
    for name, sets in cases.items():
        cfg = load_config(None, [*sets, f"training.device={device}"])
        planned = plan(cfg)
        state, peak = measure(cfg)
        predicted_state = planned.optimizer_states + planned.projectors
        rows.append({"config": name, "device": device,
                     "predicted_state_bytes": predicted_state, "measured_state_bytes": state,
                     "state_ratio": round(predicted_state / state, 4),
                     "predicted_peak_bytes": planned.total, "measured_peak_bytes": peak,
                     "peak_ratio": round(planned.total / peak, 4)})
        r = rows[-1]
        print(f"| {name} | {r['predicted_state_bytes'] / 2**20:.2f} | "
              f"{r['measured_state_bytes'] / 2**20:.2f} | {r['predicted_peak_bytes'] / 2**20:.1f} "
              f"| {r['measured_peak_bytes'] / 2**20:.1f} | {r['peak_ratio']} |", flush=True)
    print(write_csv(results_path(args.out, f"benchmarks/results/planner_{device}.csv",
                                 args.smoke), rows))


if __name__ == "__main__":
    main()
