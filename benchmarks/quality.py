"""Quality: ``subspace-optim compare`` on the embedded default (tiny LLaMA, 300 steps) for
every optimizer class of the library, the full-rank AdamW baseline, GaLore with the
randomized SVD refresh and the installed peers (apollo-torch, fira, galore-torch, torchao's
and bitsandbytes' 8-bit AdamW), each at lr x 1/3, 1 and 3 and further by 3x while its best
run is at an end of its grid (``--lr-sweep``), on this machine's CPU.

    python benchmarks/quality.py --jobs 2     # ~1.5 h on 2 cores; results/quality_sweep.csv
    python benchmarks/quality.py --no-sweep   # each at the config's lr; results/quality.csv
    python benchmarks/quality.py --smoke      # 2 optimizers, 4 steps of a smaller model (CI)

``--jobs N`` trains N runs at a time, each process on cpu_count / N threads (a tiny model's
step does not use two threads well): their tokens/s are then not a speed benchmark.
APOLLO-Mini runs with its paper's settings (rank 1, scale 128), the others with the
config's projected group (rank 32, gap 50, scale 0.25).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _results import results_path, write_csv  # noqa: E402

import subspace_optim as so  # noqa: E402
from subspace_optim.train.compare import (  # noqa: E402
    BASELINE,
    execute,
    grid_extensions,
    plan_runs,
    write_outputs,
)
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


PEERS = ["apollo_torch:APOLLOAdamW", "fira:FiraAdamW", "galore_torch:GaLoreAdamW",
         "torchao.optim:AdamW8bit", "bitsandbytes.optim:AdamW8bit"]
VARIANTS = {"ApolloMiniAdamW": "ApolloMiniAdamW[rank=1, scale=128]"}


def optimizers() -> list[str]:
    """Every class (APOLLO-Mini at its paper's settings), the randomized refresh, the
    baseline, and each peer whose package is installed."""
    ours = [VARIANTS.get(n, n) for n in classes()]
    peers = [p for p in PEERS if importlib.util.find_spec(p.split(":")[0].split(".")[0])]
    return [*ours, "GaLoreAdamW[svd=randomized]", BASELINE, *peers]


def _sharded(names: list[str], jobs: int, flags: list[str], out: Path) -> list[dict]:
    """Run ``names`` dealt out to ``jobs`` processes of this script, each on its share of
    the threads; their rows, merged (an optimizer's runs all stay in one process)."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    children = []
    for k in range(jobs):
        share = names[k::jobs]
        cmd = [sys.executable, __file__, "--optimizers", ";".join(share),
               "--rows", str(out / f"rows{k}.json"), "--out", str(out / f"shard{k}"), *flags]
        print(f"job {k + 1}/{jobs}: {', '.join(share)}", flush=True)
        children.append(subprocess.Popen(cmd, env=env))
    if any([child.wait() != 0 for child in children]):  # every job ends first
        raise SystemExit("a quality job failed; its output is above")
    return [row for k in range(jobs) for row in json.loads((out / f"rows{k}.json").read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--no-sweep", action="store_true",
                        help="each optimizer at the config's learning rate only")
    parser.add_argument("--out", type=Path, default=None, help="where the runs go "
                        "(default: a temporary directory)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time")
    parser.add_argument("--optimizers", default=None,
                        help="';'-separated subset (default: every class and peer)")
    parser.add_argument("--rows", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sets = SMOKE if args.smoke else []
    names = ["GaLoreAdamW", BASELINE] if args.smoke else optimizers()
    if args.optimizers:
        names = args.optimizers.split(";")
    cfg = load_config("default", sets)
    sweep = not (args.smoke or args.no_sweep)
    if args.jobs > 1:
        with tempfile.TemporaryDirectory() as tmp:
            out = args.out or Path(tmp)
            out.mkdir(parents=True, exist_ok=True)
            flags = ["--smoke"] * args.smoke + ["--no-sweep"] * args.no_sweep
            rows = _sharded(names, args.jobs, flags, out)
            _, md, _ = write_outputs(rows, out)
            print(md.read_text())
        if not args.smoke:
            _save(rows, sweep)
        return
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

        extend = (lambda rows, runs: grid_extensions(cfg, rows, runs)) if sweep else None
        rows = execute("default", sets, runs, out, cfg.training.steps, report, extend)
        _, md, _ = write_outputs(rows, out)
        print(md.read_text())
    if args.rows:  # a job of --jobs: its rows go back to the parent
        args.rows.write_text(json.dumps(rows))
    elif not args.smoke:
        _save(rows, sweep)


def _save(rows: list[dict], sweep: bool) -> None:
    for row in rows:
        row.pop("run_dir", None)
    name = "quality_sweep.csv" if sweep else "quality.csv"
    print(write_csv(results_path(None, f"benchmarks/results/{name}", False), rows))


if __name__ == "__main__":
    main()
