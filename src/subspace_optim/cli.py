"""The ``subspace-optim`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

try:
    import typer
except ImportError:  # the core install has no CLI dependencies
    raise SystemExit(
        "subspace-optim needs the training extra: pip install 'subspace-optim[train]'"
    ) from None

app = typer.Typer(
    help="Memory-efficient low-rank optimizers: train LLaMA models with GaLore and successors.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """subspace-optim: pretraining and fine-tuning with subspace optimizers."""


@app.command()
def train(
    config: Annotated[str, typer.Argument(
        help="A train config: a name in [bold]configs/train/[/bold] or a YAML path.")] = "default",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a value: [bold]section.key=value[/bold] (YAML), repeatable.")
    ] = None,
    resume: Annotated[Path | None, typer.Option(
        help="Continue the run in this directory from its latest checkpoint.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train a language model. With no argument: the tiny LLaMA on the Python standard
    library, with GaLore, on the CPU in a few minutes."""
    from rich.console import Console
    from rich.table import Table

    from .train.checkpoint import CheckpointError, write_atomic
    from .train.config import (
        RESUMABLE_KEYS,
        ConfigError,
        apply_resume_overrides,
        load_config,
        load_saved_config,
    )
    from .train.deps import MissingDependency
    from .train.loop import run_directory
    from .train.loop import train as run
    from .train.parallel import from_main, setup, teardown
    from .train.report import plot_losses, summary_rows

    console = Console()
    par = None
    try:
        if resume is not None:
            cfg = load_saved_config(resume / "config.json")
            for key, old, new in apply_resume_overrides(cfg, set_ or []):
                console.print(f"resume: {key} {old} -> {new}")
            if set_:
                write_atomic(resume / "config.json",
                             lambda f: f.write(json.dumps(cfg.to_dict(), indent=2).encode()))
            run_dir = resume
        else:
            cfg = load_config(config, set_ or [])
        # Under torchrun: every rank joins the process group; rank 0 alone speaks, names
        # the run directory (from the clock) and tells the others.
        par = setup(cfg)
        console.quiet = not par.main
        if resume is None:
            named: Path | ConfigError | None = None
            if par.main:
                try:
                    named = run_directory(cfg, Path(config).stem)
                except ConfigError as error:  # the other ranks must hear of it too
                    named = error
            named = from_main(par, named)
            if isinstance(named, ConfigError):
                raise named
            run_dir = named
        console.print(f"[bold]run[/bold] {run_dir}  optimizer [bold]{cfg.optimizer.name}[/bold]"
                      f"  model [bold]{cfg.model}[/bold]  data [bold]{cfg.data.source}[/bold]")
        result = run(cfg, run_dir, resume=resume is not None, progress=progress)
    except (ConfigError, CheckpointError, MissingDependency, FileNotFoundError) as error:
        if par is not None:
            teardown(par)
        console.print(f"[bold red]error:[/bold red] {error}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        # A second Ctrl-C: stopped in the middle of a step, nothing saved.
        console.print("[yellow]stopped at once without saving[/yellow]; the last checkpoint "
                      f"stays in force: subspace-optim train --resume {run_dir}")
        raise typer.Exit(130) from None
    if result.already_finished:
        console.print(f"{run_dir} is finished: step {result.steps} of {cfg.training.steps}. "
                      f"To train further: subspace-optim train --resume {run_dir} "
                      f"--set training.steps=N (N > {result.steps}); keys that may change on "
                      f"resume: {', '.join(RESUMABLE_KEYS)}")
        return
    teardown(par)
    if not par.main:
        raise typer.Exit(130 if result.interrupted else 0)
    if not run_dir.exists():  # stopped before its first step: nothing to show or resume
        console.print("[yellow]stopped before the first step; nothing was saved[/yellow]")
        raise typer.Exit(130)
    plot = plot_losses(run_dir)
    table = Table(title="summary", show_header=False)
    for key, value in summary_rows(run_dir):
        table.add_row(key, value)
    console.print(table)
    console.print(f"loss curves: {plot}")
    if result.skipped_steps:
        console.print(f"[yellow]{result.skipped_steps} step(s) had a NaN or inf gradient; "
                      "their parameters were not updated (skipped_steps in metrics.jsonl)"
                      "[/yellow]")
    if result.interrupted:
        console.print(f"[yellow]stopped at step {result.steps}; continue with[/yellow] "
                      f"subspace-optim train --resume {run_dir}")
        raise typer.Exit(130)


@app.command()
def memory(
    config: Annotated[str, typer.Argument(
        help="A train config: a name in [bold]configs/train/[/bold] or a YAML path.")] = "default",
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a value: [bold]section.key=value[/bold] (YAML), repeatable.")
    ] = None,
    gpu_gib: Annotated[float | None, typer.Option(
        "--gpu-gib", help="Say whether the run fits a GPU of this many GiB.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object of byte counts.")
                     ] = False,
) -> None:
    """Plan a run's memory: weights, gradients, optimizer states, projectors, activations,
    workspace and the peak, from the real model and optimizer built on the meta device (no
    memory is allocated for them)."""
    from rich.console import Console
    from rich.table import Table

    from .train.config import ConfigError, load_config
    from .train.planner import KEYS, fits, plan

    console = Console()
    try:
        cfg = load_config(config, set_ or [])
        if gpu_gib is not None and not gpu_gib > 0:
            raise ConfigError(f"--gpu-gib must be a number > 0, got {gpu_gib}")
        result = plan(cfg)
    except (ConfigError, ValueError, TypeError) as error:
        console.print(f"[bold red]error:[/bold red] {error}")
        raise typer.Exit(2) from None
    figures = result.to_dict()
    if json_:
        record = dict(figures)
        if gpu_gib is not None:
            record["gpu_bytes"] = int(gpu_gib * 2**30)
            record["fits"] = fits(result, gpu_gib)
        typer.echo(json.dumps(record))
        return
    t = cfg.training
    switches = [name for name, on in (("layer-wise", t.layerwise), ("INT8 weights", t.int8_weights),
                                      ("activation checkpointing", t.activation_checkpointing))
                if on]
    table = Table(title=f"{cfg.model}, {cfg.optimizer.name}, batch {t.batch_size} x "
                        f"{cfg.data.seq_len} tokens, {t.dtype}"
                        + (f", {', '.join(switches)}" if switches else ""))
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("bytes", justify="right")
    for key in KEYS:
        style = "bold" if key == "total" else None
        table.add_row(key.replace("_", " "), f"{figures[key] / 2**30:.3f}", f"{figures[key]:,}",
                      style=style)
    console.print(table)
    console.print("total: the peak, where activations or gradients meet the workspace "
                  "(see the README's memory planner section)")
    if gpu_gib is not None:
        verdict = "[green]fits[/green]" if fits(result, gpu_gib) else "[red]does not fit[/red]"
        console.print(f"a {gpu_gib:g} GiB GPU: {verdict}")
