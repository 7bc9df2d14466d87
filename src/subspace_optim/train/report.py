"""What a finished run shows a person: a summary table and a PNG of the loss curves."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    train, val = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        (val if "val_loss" in record else train).append(record)
    return train, val


def plot_losses(run_dir: Path) -> Path:
    """``loss.png``: training loss per logging window and validation loss, against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_rows(run_dir: Path) -> list[tuple[str, str]]:
    train, val = read_metrics(run_dir)
    rows = []
    if val:
        rows.append(("validation perplexity", f"{val[0]['val_ppl']:.2f} -> {val[-1]['val_ppl']:.2f}"
                     f" (steps {val[0]['step']} -> {val[-1]['step']})"))
    if train:
        last = train[-1]
        rows += [
            ("steps", str(last["step"])),
            ("final training loss", f"{last['loss']:.4f}"),
            ("throughput", f"{last['tokens_per_s']:,.0f} tokens/s"),
            ("optimizer state", f"{last['optimizer_state_bytes'] / 2**20:.2f} MiB"),
            ("peak memory", f"{last['peak_memory_bytes'] / 2**20:.0f} MiB"),
            ("steps with a NaN/inf gradient",
             str(sum(r.get("skipped_steps", 0) for r in train))),
        ]
    rows.append(("run directory", str(run_dir)))
    return rows
