"""The benchmark scripts run at tiny sizes (``--smoke``), so that they cannot rot."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,first_row", [
    ("step_floor.py", "two-GEMM floor"),
    ("step_overhead.py", "GaLoreAdamW foreach"),
])
def test_smoke_run_writes_its_csv(script, first_row, tmp_path):
    out = tmp_path / "result.csv"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["step"] == first_row
    assert all(row["device"] and row["commit"] and row["date"] for row in rows)
