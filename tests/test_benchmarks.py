"""The benchmark scripts run at tiny sizes (``--smoke``), so that they cannot rot."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,column,first_row", [
    ("step_floor.py", "step", "two-GEMM floor"),
    ("step_overhead.py", "step", "GaLoreAdamW foreach"),
])
def test_smoke_run_writes_its_csv(script, column, first_row, tmp_path):
    out = tmp_path / "result.csv"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert rows[0][column] == first_row
    assert all(row["device"] and row["commit"] and row["date"] for row in rows)


def test_the_floor_benchmark_accounts_for_the_whole_step(tmp_path):
    out = tmp_path / "floor.csv"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_floor.py"),
                             "--smoke", "--out", str(out)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {r["step"]: r for r in csv.DictReader(out.open())}
    # Every step is measured against a floor that ran in the same rounds.
    assert rows["GaLoreAdamW foreach"]["floor"] == "two-GEMM floor"
    assert float(rows["two-GEMM floor"]["vs_floor"]) == 1.0
    parts = list(csv.DictReader((tmp_path / "floor_breakdown.csv").open()))
    for timed in ("GaLoreAdamW foreach", "two-GEMM floor"):
        shares = {r["component"]: float(r["share_of_its_time"]) for r in parts
                  if r["timed"] == timed}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
        assert shares["projection and back-projection GEMMs"] > 0
        # The moment update is the step's, not the floor's.
        assert (shares["fused moment update"] > 0) == (timed == "GaLoreAdamW foreach")


def test_the_kernel_benchmark_times_every_kernel_and_the_whole_step(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "kernels.csv"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_speed.py"),
                             "--smoke", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert all(row["device"] and row["commit"] and row["date"] for row in rows)
    from subspace_optim import ops

    timed = {row["op"] for row in rows}
    assert set(ops.triton_registered()) - {"flora_matrix"} <= timed
    assert {"GaLoreAdamW step", "down-projection GEMM"} <= timed
    assert {row["dtype"] for row in rows} == {"float32", "bfloat16"}
    assert all(float(row["torch_ms"]) > 0 and float(row["triton_ms"]) > 0 for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU would run the whole benchmark")
def test_the_kernel_benchmark_refuses_a_cpu_timing():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_speed.py")],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "needs a CUDA GPU" in result.stderr


def _repo_state() -> tuple[str, dict[str, bytes]]:
    """``git status`` of the checkout and the bytes of every committed result."""
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, cwd=ROOT)
    results = {p.name: p.read_bytes() for p in sorted((ROOT / "benchmarks" / "results").iterdir())}
    return status.stdout, results


@pytest.mark.parametrize("script,expect", [
    ("peers.py", ["torch AdamW (foreach)", "GaLoreAdamW", "two-GEMM floor"]),
    ("refresh_cost.py", ["galore 48x96", "q_galore 96x200"]),
    ("planner.py", ["| tiny |"]),
    ("quality.py", ["| GaLoreAdamW |", "| AdamW |"]),
    ("distributed.py", ["| 64x96 | 2 | 2 |"]),
    ("step_floor.py", ["two-GEMM floor"]),
    ("step_overhead.py", ["GaLoreAdamW foreach"]),
])
def test_smoke_runs_leave_the_checkout_as_it_was(script, expect):
    """Every benchmark runs end to end at tiny sizes, and a smoke run (no ``--out``) neither
    touches the committed results that back the README's tables nor leaves a file behind."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    before = _repo_state()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for text in expect:
        assert text in result.stdout, (text, result.stdout[-3000:])
    after = _repo_state()
    assert after[0] == before[0], "the smoke run changed git status"
    changed = [name for name in before[1] if after[1].get(name) != before[1][name]]
    assert not changed, f"the smoke run rewrote committed results: {changed}"
