"""``subspace-optim compare``: the same model, data and token budget with each optimizer.

Each run is a ``subspace-optim train`` of its own process (so that peak memory, the
process's resident maximum on the CPU and the allocator's on CUDA, is the run's own), in
``<compare dir>/<run name>``. ``AdamW`` names the full-rank baseline: torch's AdamW update
(``SubspaceAdamW`` groups without ``rank``) with the projected run's learning rates per
group, ``lr`` for the rest and ``lr x scale`` for the weights the others project, since a
comparison that gives every optimizer one learning rate measures the learning rate.
``--lr-sweep`` runs each optimizer at ``lr x {1/3, 1, 3}`` (both groups of the baseline
scaled together) and reports the best by final validation perplexity; while an optimizer's
best run lies at an end of its grid, the grid grows by another factor of 3 on that side (at
most ``MAX_EXTENSIONS`` times), so that every reported optimum is inside its grid. Runs
already finished in the output folder are kept, so a comparison stopped part-way continues.
``Class[key=value, ...]`` names a variant: the class with those projected-group keys
changed (``GaLoreAdamW[svd=randomized]``), compared as an optimizer of its own.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, RunConfig
from .report import read_metrics

BASELINE = "AdamW"
SWEEP = (1 / 3, 1.0, 3.0)
MAX_EXTENSIONS = 3
# Classes whose constructor conventions differ from the config's projected group: Adafactor
# runs at the compared lr (no relative steps), FloraAdafactor's groups take no scale.
ADAFACTOR_AT_LR = "optimizer.kwargs={relative_step: false, scale_parameter: false}"
ADAFACTOR_CLASSES = ("SubspaceAdafactor", "GaLoreAdafactor")


# Group keys the reference packages read without a default, from the config's: their
# projected group then holds the same rank, gap and scale as this library's.
PEER_GROUP_KEYS = {
    "galore_torch": {"proj_type": "std"},
    "apollo_torch": {"proj_type": "std", "proj": "random", "scale_type": "channel"},
    "fira": {"proj_type": "std"},
}


def split_optimizers(text: str) -> list[str]:
    """``--optimizers``' names: split at commas, except those inside a variant's brackets."""
    names, current, depth = [], "", 0
    for char in text:
        if char == "," and depth == 0:
            names.append(current.strip())
            current = ""
            continue
        depth += (char == "[") - (char == "]")
        current += char
    names.append(current.strip())
    return [n for n in names if n]


def variant(name: str) -> tuple[str, dict]:
    """``Class[key=value, ...]``: the class and the projected-group keys the variant sets
    (values read as YAML); a plain name has none."""
    if "[" not in name:
        return name, {}
    base, _, inner = name.partition("[")
    if not inner.endswith("]") or not base.strip():
        raise ConfigError(f"--optimizers: {name!r}: write a variant as Class[key=value, ...]")
    import yaml

    keys = {}
    for item in filter(None, (s.strip() for s in inner[:-1].split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--optimizers: {name!r}: write each group key as key=value, "
                              f"got {item!r}")
        keys[key.strip()] = yaml.safe_load(value)
    return base.strip(), keys


def _group(group: dict) -> str:
    return "optimizer.group={" + ", ".join(f"{k}: {v!r}" for k, v in group.items()) + "}"


def class_overrides(name: str, cfg: RunConfig, keys: dict | None = None) -> list[str]:
    """The ``--set`` values that make the config's projected group fit class ``name``, with
    a variant's ``keys`` added to it."""
    keys = keys or {}
    if ":" in name:
        package = name.split(":")[0].split(".")[0]
        extra = PEER_GROUP_KEYS.get(package)
        if extra is None or not cfg.optimizer.group:
            return [_group({**cfg.optimizer.group, **keys})] if keys else []
        group = {**extra, **cfg.optimizer.group, **keys}
        if package == "fira":  # fira calls the scale alpha
            group["alpha"] = group.pop("scale", 1.0)
        if package in ("galore_torch", "apollo_torch", "fira"):
            group.pop("projector", None)
        return [_group(group)]
    group = _own_group(name, cfg, keys)
    if name in ADAFACTOR_CLASSES:
        return [ADAFACTOR_AT_LR, *([_group(group)] if keys else [])]
    return [_group(group)] if keys or name == "FloraAdafactor" else []


def _own_group(name: str, cfg: RunConfig, keys: dict) -> dict:
    group = {**cfg.optimizer.group, **keys}
    if name == "FloraAdafactor":
        group = {k: v for k, v in group.items() if k not in ("scale", "projector")}
    return group
FIELDS = ("optimizer", "lr", "best", "final_val_ppl", "tokens_per_s", "optimizer_state_bytes",
          "peak_memory_bytes", "wall_s", "run_dir")


@dataclass
class Run:
    optimizer: str
    lr: float
    name: str
    overrides: list[str]


def plan_runs(cfg: RunConfig, optimizers: list[str], lr_sweep: bool) -> list[Run]:
    import subspace_optim

    known = {n for n in subspace_optim.__all__ if isinstance(getattr(subspace_optim, n), type)
             and issubclass(getattr(subspace_optim, n), subspace_optim.SubspaceOptimizer)
             and n != "SubspaceOptimizer"} | {BASELINE}
    for full in optimizers:
        name, keys = variant(full)
        if ":" in name:  # module:Class of another installed package
            from .model import foreign_optimizer

            foreign_optimizer(name)
            continue
        if keys and name == BASELINE:
            raise ConfigError(f"--optimizers: {full!r}: the full-rank baseline has no "
                              "projected group to change")
        if name in known and keys:
            _check_variant(cfg, name, keys, full)
        if name not in known:
            from .config import suggest

            raise ConfigError(f"--optimizers: unknown optimizer {name!r}"
                              f"{suggest(name, sorted(known))}; the classes are "
                              f"{', '.join(sorted(known))}, or module:Class of another "
                              "installed package")
    if len(set(optimizers)) != len(optimizers):
        raise ConfigError(f"--optimizers names one optimizer twice: {optimizers}")
    base_lr = cfg.optimizer.lr
    if base_lr is None:
        raise ConfigError("compare needs optimizer.lr (the learning rate it scales)")
    return [make_run(cfg, name, base_lr * factor, lr_sweep) for name in optimizers
            for factor in (SWEEP if lr_sweep else (1.0,))]


def _check_variant(cfg: RunConfig, name: str, keys: dict, full: str) -> None:
    """A variant's keys checked on a stand-in model now, not after the runs before it."""
    import dataclasses

    from .model import check_optimizer_config

    kwargs = dict(cfg.optimizer.kwargs)
    if name in ADAFACTOR_CLASSES:
        kwargs.update(relative_step=False, scale_parameter=False)
    trial = dataclasses.replace(cfg, optimizer=dataclasses.replace(
        cfg.optimizer, name=name, group=_own_group(name, cfg, keys), kwargs=kwargs))
    try:
        check_optimizer_config(trial)
    except ConfigError as error:
        raise ConfigError(f"--optimizers: {full!r}: {error}") from None


def make_run(cfg: RunConfig, full: str, lr: float, swept: bool) -> Run:
    name, keys = variant(full)
    # module:Class and Class[key=value]: a directory name
    safe = "".join(c if c.isalnum() or c in "._" else "-" for c in full).strip("-")
    tag = f"{safe}-lr{lr:.3g}" if swept else safe
    if name == BASELINE:
        scale = float(cfg.optimizer.group.get("scale", 1.0))
        overrides = ["optimizer.name=SubspaceAdamW", f"optimizer.lr={lr!r}",
                     f"optimizer.group={{lr: {lr * scale!r}}}"]
    else:
        overrides = [f"optimizer.name={name}", f"optimizer.lr={lr!r}",
                     *class_overrides(name, cfg, keys)]
    return Run(full, lr, tag, overrides)


def grid_extensions(cfg: RunConfig, rows: list[dict], runs: list[Run]) -> list[Run]:
    """New runs for each optimizer whose best lr is at an end of the grid it has run: the
    next lr by a factor of 3 beyond that end, unless the grid grew ``MAX_EXTENSIONS`` times
    already or the run exists."""
    out = []
    names = list(dict.fromkeys(r.optimizer for r in runs))
    for name in names:
        done = [r for r in rows if r["optimizer"] == name]
        if not done:
            continue
        lrs = sorted({r["lr"] for r in done})
        best = min(done, key=lambda r: r["final_val_ppl"])["lr"]
        base = cfg.optimizer.lr
        grown = len(lrs) - len(SWEEP)
        if grown >= MAX_EXTENSIONS or len(lrs) < 2:
            continue
        if best == lrs[0]:
            lr = lrs[0] / 3
        elif best == lrs[-1]:
            lr = lrs[-1] * 3
        else:
            continue
        if any(abs(r.lr - lr) <= 1e-12 * base and r.optimizer == name for r in runs):
            continue
        out.append(make_run(cfg, name, lr, True))
    return out


def _last_step(run_dir: Path) -> int:
    try:
        train, _ = read_metrics(run_dir)
    except (OSError, json.JSONDecodeError):
        return 0
    return train[-1]["step"] if train else 0


def execute(config: str, sets: list[str], runs: list[Run], out: Path, steps: int,
            on_progress: Callable[[int], None],
            extend: Callable[[list[dict], list[Run]], list[Run]] | None = None) -> list[dict]:
    """Train every run in turn; ``on_progress(steps done over the whole comparison)``.
    ``extend(rows, runs)``: runs to add once these are done (the lr grid's extensions);
    they are appended to ``runs``, and asked for again until there are none."""
    rows = []
    i = 0
    while i < len(runs) or (extend is not None and _extended(extend, rows, runs)):
        run = runs[i]
        i += 1
        rows.append(_execute_one(config, sets, run, out, steps, i - 1, on_progress))
    _mark_best(rows)
    return rows


def _extended(extend, rows: list[dict], runs: list[Run]) -> bool:
    more = extend(rows, runs)
    runs.extend(more)
    return bool(more)


def _execute_one(config: str, sets: list[str], run: Run, out: Path, steps: int, i: int,
             on_progress: Callable[[int], None]) -> dict:
    run_dir = out / run.name
    done = _finished(run_dir, steps)
    if done is not None:  # a comparison stopped part-way continues where it stopped
        on_progress((i + 1) * steps)
        return _row(run, run_dir, done)
    if run_dir.exists():  # this comparison's own run, stopped part-way: train it again
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "subspace_optim", "train", config, "--no-progress"]
    for s in [*sets, *run.overrides, f"output.dir={out}", f"output.name={run.name}"]:
        cmd += ["--set", s]
    began = time.perf_counter()
    with open(out / f"{run.name}.log", "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            on_progress(i * steps + _last_step(run_dir))
            time.sleep(0.5)
    if process.returncode != 0:
        tail = (out / f"{run.name}.log").read_text()[-2000:]
        raise ConfigError(f"the {run.name} run failed (exit {process.returncode}); its "
                          f"log, {out / (run.name + '.log')}, ends:\n{tail}")
    on_progress((i + 1) * steps)
    wall = time.perf_counter() - began
    (out / f"{run.name}.json").write_text(json.dumps({"wall_s": wall}))
    return _row(run, run_dir, wall)


def _finished(run_dir: Path, steps: int) -> float | None:
    """The wall time of a run already trained to ``steps`` (NaN when it was not recorded),
    or ``None``."""
    try:
        _, val = read_metrics(run_dir)
    except (OSError, json.JSONDecodeError):
        return None
    if not val or val[-1]["step"] != steps:
        return None
    record = run_dir.parent / f"{run_dir.name}.json"
    return json.loads(record.read_text())["wall_s"] if record.exists() else float("nan")


def _row(run: Run, run_dir: Path, wall: float) -> dict:
    train, val = read_metrics(run_dir)
    rates = [r["tokens_per_s"] for r in train]
    return {"optimizer": run.optimizer, "lr": run.lr, "best": False,
            "final_val_ppl": val[-1]["val_ppl"],
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else float("nan"),
            "optimizer_state_bytes": train[-1]["optimizer_state_bytes"],
            "peak_memory_bytes": train[-1]["peak_memory_bytes"], "wall_s": wall,
            "run_dir": str(run_dir)}


def _mark_best(rows: list[dict]) -> None:
    best: dict[str, dict] = {}
    for row in rows:
        held = best.get(row["optimizer"])
        if held is None or row["final_val_ppl"] < held["final_val_ppl"]:
            best[row["optimizer"]] = row
    for row in best.values():
        row["best"] = True


def write_outputs(rows: list[dict], out: Path) -> tuple[Path, Path, Path]:
    """``results.csv`` (every run), ``results.md`` (the best run per optimizer) and
    ``curves.png`` (their loss curves)."""
    csv_path = out / "results.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    best = [r for r in rows if r["best"]]
    lines = ["| optimizer | lr | final validation perplexity | tokens/s | optimizer state "
             "(MiB) | peak memory (MiB) | wall time (s) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(best, key=lambda r: r["final_val_ppl"]):
        lines.append(f"| {r['optimizer']} | {r['lr']:.3g} | {r['final_val_ppl']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['optimizer_state_bytes'] / 2**20:.2f} | "
                     f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['wall_s']:.1f} |")
    md_path = out / "results.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path, _plot(best, out / "curves.png")


def _plot(best: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for row in best:
        train, val = read_metrics(Path(row["run_dir"]))
        kind = ", full rank" if row["optimizer"] == BASELINE else ""
        label = f"{row['optimizer']}{kind} (lr {row['lr']:.3g})"
        line, = ax_train.plot([r["step"] for r in train], [r["loss"] for r in train],
                              label=label)
        ax_val.plot([r["step"] for r in val], [r["val_ppl"] for r in val], "o-",
                    color=line.get_color(), label=label)
    ax_train.set_title("training loss")
    ax_train.set_xlabel("step")
    ax_train.set_ylabel("loss (nats per token)")
    ax_val.set_title("validation perplexity")
    ax_val.set_xlabel("step")
    ax_val.set_yscale("log")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
