"""Quality: ``subspace-optim compare`` on the embedded default (tiny LLaMA, 300 steps) for
every optimizer class of the library and the full-rank AdamW baseline, each at lr x 1/3, 1
and 3 (``--lr-sweep``), on this machine's CPU.

    python benchmarks/quality.py              # ~45 min on 2 cores; results/quality_sweep.csv
    python benchmarks/quality.py --no-sweep   # each at the config's lr; results/quality.csv
    python benchmarks/quality.py --smoke      # 2 optimizers, 4 steps of a smaller model (CI)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _results import write_csv  # noqa: E402

import subspace_optim as so  # noqa: E402
from subspace_optim.train.compare import BASELINE, execute, plan_runs, write_outputs  # noqa: E402
from subspace_optim.train.config import load_config  # noqa: E402

SMOKE = ["model_config.hidden_size=32", "model_config.num_hidden_layers=1",
         "model_config.num_attention_heads=2", "model_config.intermediate_size=64",
         "data.vocab_size=300", "data.seq_len=32", "data.max_train_bytes=30000",
         "data.max_val_bytes=10000", "training.batch_size=2", "training.warmup_steps=1",
         "training.steps=4", "training.eval_every=2", "training.eval_batches=1",
         "training.checkpoint_every=4", "training.log_every=2",
         "optimizer.group={rank: 8, update_proj_gap: 2, scale: 0.25}"]


def classes() -> list[str]:
    return [n for n in so.__all__ if isinstance(getattr(so, n), type)
            and issubclass(getattr(so, n), so.SubspaceOptimizer)
            and getattr(so, n) is not so.SubspaceOptimizer]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--no-sweep", action="store_true",
                        help="each optimizer at the config's learning rate only")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sets = SMOKE if args.smoke else []
    names = ["GaLoreAdamW", BASELINE] if args.smoke else [*classes(), BASELINE]
    cfg = load_config("default", sets)
    sweep = not (args.smoke or args.no_sweep)
    runs = plan_runs(cfg, names, lr_sweep=sweep)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        done = {"n": -1}

        def report(steps: int) -> None:
            run = steps // cfg.training.steps
            if run != done["n"] and run < len(runs):
                done["n"] = run
                print(f"[{run + 1}/{len(runs)}] {runs[run].name}", flush=True)

        rows = execute("default", sets, runs, out, cfg.training.steps, report)
        _, md, _ = write_outputs(rows, out)
        print(md.read_text())
    if args.smoke:
        return
    for row in rows:
        row.pop("run_dir")
    name = "quality_sweep.csv" if sweep else "quality.csv"
    print(write_csv(f"benchmarks/results/{name}", rows))


if __name__ == "__main__":
    main()
