"""Gradient memory of step_in_backward on a small LLaMA-shaped model at rank d/4: bytes of
parameter gradients plus window accumulators alive at the peak of a step, against the full
gradient of an ordinary backward.

    python benchmarks/layerwise_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from _results import results_path, write_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_layerwise as tl  # noqa: E402  (the model and the tracker the test uses)

import subspace_optim as so  # noqa: E402


def main() -> None:
    rows = []
    for k in (1, 4):
        model = tl._model()
        tl._loss(model, tl._batch(0)).backward()
        full = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
        model.zero_grad()
        opt = so.GaLoreAdamW(tl._groups(model, rank=16))
        peak = tl._grad_bytes_tracker(model, opt)
        tl._train(model, opt, 3, k=k, layerwise=True)
        rows.append({"accumulation_steps": k, "full_gradient_bytes": full,
                     "peak_bytes": peak[0], "ratio": round(peak[0] / full, 4)})
    where = write_csv(results_path(None, "benchmarks/results/layerwise_memory.csv", False), rows)
    for r in rows:
        print(f"k={r['accumulation_steps']}: peak {r['peak_bytes']:,} of "
              f"{r['full_gradient_bytes']:,} bytes ({100 * r['ratio']:.1f}%)")
    print(where)


if __name__ == "__main__":
    main()
