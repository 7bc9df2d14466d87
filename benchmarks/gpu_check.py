"""Everything that waits for a GPU, in one command for the day one is lent.

    python benchmarks/gpu_check.py             # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --dry-run   # what it would run, anywhere

In order, each step a process of its own with a share of the time budget (8 minutes in all
by default), so that one step that hangs or fails does not cost the others:

1. the kernel and optimizer-level tests on CUDA (``tests/test_kernels*.py``,
   ``tests/test_ops.py``), then every test marked ``gpu``; results per test in ``tests.csv``;
2. ``benchmarks/kernel_speed.py`` on LLaMA-1B shapes (each kernel against its PyTorch op, and the
   fused step against the foreach step);
3. ``benchmarks/peers.py``: state bytes and the steady step of every class against the peers;
4. ``benchmarks/planner.py``: the memory planner against CUDA's allocator peak for 60M,
   350M and 1B.

Results go to ``benchmarks/results/gpu/<gpu name>/`` (each CSV with the GPU's name, the
commit and the date), with ``gpu_check.csv`` listing every step, its outcome and time.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from _results import write_csv  # noqa: E402

TESTS = ["tests/test_kernels.py", "tests/test_kernels_optimizer.py",
         "tests/test_kernels_like_hardware.py", "tests/test_ops.py"]


def steps(out: Path) -> list[tuple[str, list[str], float]]:
    """(name, command, share of the budget)."""
    py = sys.executable
    return [
        ("kernel tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS,
                          f"--junitxml={out / 'kernel_tests.xml'}"], 0.25),
        ("gpu tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-m",
                       "gpu", f"--junitxml={out / 'gpu_tests.xml'}"], 0.1),
        ("kernels", [py, "benchmarks/kernel_speed.py", "--models", "LLaMA-1B", "--repeats", "11",
                     "--out", str(out / "kernels.csv")], 0.25),
        ("peers", [py, "benchmarks/peers.py", "--rounds", "5", "--out",
                   str(out / "peers.csv")], 0.2),
        ("planner", [py, "benchmarks/planner.py", "--out", str(out / "planner.csv")], 0.2),
    ]


def _test_rows(xml: Path) -> list[dict]:
    if not xml.exists():
        return []
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}",
                     "outcome": outcome, "seconds": case.get("time")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds for all steps together (default 480)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the steps and where their results would go")
    args = parser.parse_args()
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    out = ROOT / "benchmarks" / "results" / "gpu" / re.sub(r"[^A-Za-z0-9.-]+", "-", name)
    plan = steps(out)
    if args.dry_run:
        for step, command, share in plan:
            print(f"{step} ({share * args.budget:.0f} s): {' '.join(command)}")
        print(f"results: {out}")
        return
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; it runs the GPU-only checks on a machine with "
              "one (--dry-run shows them)", file=sys.stderr)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for step, command, share in plan:
        start = time.perf_counter()
        print(f"[{step}] {' '.join(command)}", flush=True)
        try:
            result = subprocess.run(command, cwd=ROOT, timeout=share * args.budget)
            outcome = "ok" if result.returncode == 0 else f"exit {result.returncode}"
        except subprocess.TimeoutExpired:
            outcome = f"timed out after {share * args.budget:.0f} s"
        summary.append({"step": step, "outcome": outcome,
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"[{step}] {outcome}", flush=True)
    tests = _test_rows(out / "kernel_tests.xml") + _test_rows(out / "gpu_tests.xml")
    if tests:
        write_csv(str(out / "tests.csv"), tests)
    print(write_csv(str(out / "gpu_check.csv"), summary))
    with open(out / "gpu_check.csv") as f:
        failed = [r for r in csv.DictReader(f) if r["outcome"] != "ok"]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
