"""Shared bookkeeping of the benchmark scripts: the machine, the commit, the date, the CSV."""

from __future__ import annotations

import csv
import datetime
import platform
import subprocess
import tempfile
from pathlib import Path

import torch


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    return f"{name}, {torch.get_num_threads()} threads ({platform.system()})"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def results_path(out: str | None, default: str, smoke: bool) -> str:
    """Where a benchmark writes its CSV: ``--out`` when given; a smoke run otherwise writes
    to the temporary directory, never over the committed results that back the README's
    tables; a plain run writes ``default`` and says so when it replaces a committed file."""
    if out:
        return out
    if smoke:
        return str(Path(tempfile.gettempdir()) / "subspace_optim_benchmarks" / Path(default).name)
    target = Path(default)
    if target.exists():
        print(f"this run replaces {default} (committed results; git diff shows the change, "
              "--out writes elsewhere)", flush=True)
    return default


def write_csv(path: str, rows: list[dict]) -> str:
    """Write ``rows`` with machine, commit and date columns; return a one-line provenance."""
    info = {"device": machine(), "commit": commit(), "date": datetime.date.today().isoformat()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *info])
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **info})
    return f"{info['device']}; commit {info['commit']}; {info['date']}"


def interleaved_times(candidates: dict, rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds of each callable in each of ``rounds`` rounds, the candidates interleaved in a
    new random order each round, so that drift and the cache state the previous one left
    hit every candidate alike."""
    import random
    import time

    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = random.Random(seed)
    for _ in range(rounds):
        for name, fn in order.sample(list(candidates.items()), len(candidates)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(candidates: dict, rounds: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of each callable over ``rounds`` interleaved rounds."""
    import statistics

    return {name: statistics.median(t)
            for name, t in interleaved_times(candidates, rounds, seed).items()}


def paired_ratio(times: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios ``times[i] / baseline[i]``. Both ran in
    the same round, so a slow stretch of the machine (another tenant, a frequency step)
    slows both and cancels, which the ratio of two medians does not do."""
    import statistics

    ratios = [t / b for t, b in zip(times, baseline, strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q25, q50, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q50, q25, q75


def progress(items, desc: str, unit: str = "case"):
    """``items`` with a progress bar (tqdm, when installed; a line per item otherwise)."""
    try:
        from tqdm import tqdm
    except ImportError:
        items = list(items)

        def plain():
            for i, item in enumerate(items):
                print(f"{desc}: {i + 1}/{len(items)}", flush=True)
                yield item

        return plain()
    return tqdm(items, desc=desc, unit=unit)
