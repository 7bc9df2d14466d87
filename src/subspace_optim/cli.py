"""The ``subspace-optim`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

try:
    import typer
except ImportError:  # the core install has no CLI dependencies
    raise SystemExit(
        "subspace-optim needs the training extra: pip install \".[train]\" (in the "
        "repository's checkout)"
    ) from None

from rich.markup import escape

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
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="Print the optimizer's state per parameter at the end.")] = False,
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
        from .train.model import check_optimizer_config

        check_optimizer_config(cfg)
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
        result = run(cfg, run_dir, resume=resume is not None, progress=progress,
                     say=console.print, verbose=verbose)
    except (ConfigError, CheckpointError, MissingDependency, FileNotFoundError,
            ImportError) as error:
        if par is not None:
            teardown(par)
        console.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False)
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
        raise typer.Exit(result.exit_status if result.interrupted else 0)
    if not run_dir.exists():  # stopped before its first step: nothing to show or resume
        console.print("[yellow]stopped before the first step; nothing was saved[/yellow]")
        raise typer.Exit(130)
    plot = plot_losses(run_dir)
    table = Table(title="summary", show_header=False)
    for key, value in summary_rows(run_dir):
        table.add_row(key, value)
    console.print(table)
    if result.state_table:
        console.print(result.state_table, markup=False, highlight=False)
    console.print(f"loss curves: {plot}")
    if result.skipped_steps:
        console.print(f"[yellow]{result.skipped_steps} step(s) had a NaN or inf gradient; "
                      "their parameters were not updated (skipped_steps in metrics.jsonl)"
                      "[/yellow]")
    if result.interrupted:
        console.print(f"[yellow]stopped at step {result.steps}; continue with[/yellow] "
                      f"subspace-optim train --resume {run_dir}")
        raise typer.Exit(result.exit_status)


@app.command()
def memory(
    config: Annotated[str, typer.Argument(
        help="A train config (a name in [bold]configs/train/[/bold] or a YAML path), or a "
             "Hugging Face model's [bold]config.json[/bold] (or its directory).")] = "default",
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

    from .train.config import ConfigError, hf_model_overrides, hf_model_path, load_config
    from .train.planner import KEYS, fits, plan

    console = Console()
    try:
        hf = hf_model_path(config)
        if hf is not None:
            cfg = load_config(None, [*hf_model_overrides(hf), *(set_ or [])])
            cfg.model = hf.parent.name or str(hf)
        else:
            cfg = load_config(config, set_ or [])
        if gpu_gib is not None and not gpu_gib > 0:
            raise ConfigError(f"--gpu-gib must be a number > 0, got {gpu_gib}")
        result = plan(cfg)
    except (ConfigError, ValueError, TypeError, ImportError) as error:
        console.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False)
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


@app.command()
def compare(
    config: Annotated[str, typer.Argument(
        help="A train config: a name in [bold]configs/train/[/bold] or a YAML path.")],
    optimizers: Annotated[str, typer.Option(
        help="Comma-separated optimizer classes of this library, or module:Class of any "
             "installed package (apollo_torch:APOLLOAdamW), or a variant with other group keys "
             "(GaLoreAdamW\\[svd=randomized]); [bold]AdamW[/bold] is the full-rank baseline "
             "at the projected run's per-group learning rates.")],
    lr_sweep: Annotated[bool, typer.Option(
        help="Run each optimizer at lr x 1/3, 1, 3 (and further by 3x while the best is at "
             "an end of the grid) and report the best.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a value of every run: [bold]section.key=value[/bold].")
    ] = None,
    out: Annotated[Path | None, typer.Option(
        help="Where the runs and results go (default runs/compare-<config>-<time>).")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
) -> None:
    """Train the same model on the same data and token budget with each optimizer; write
    results.csv (every run), results.md (the best run per optimizer) and curves.png."""
    import datetime

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from .train.compare import (
        execute,
        grid_extensions,
        plan_runs,
        split_optimizers,
        write_outputs,
    )
    from .train.config import ConfigError, load_config

    console = Console()
    try:
        cfg = load_config(config, set_ or [])
        names = split_optimizers(optimizers)
        if not names:
            raise ConfigError("--optimizers names no optimizer")
        runs = plan_runs(cfg, names, lr_sweep)
        out = out or Path(cfg.output.dir) / \
            f"compare-{Path(config).stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        if (out / "results.csv").exists():
            raise ConfigError(f"{out} already holds a comparison")
        out.mkdir(parents=True, exist_ok=True)
        total = len(runs) * cfg.training.steps
        with Progress(TextColumn("[bold]compare"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[run]}"), TimeRemainingColumn(),
                      disable=not progress, console=console) as bar:
            task = bar.add_task("compare", total=total, run="")

            def advance(done: int) -> None:
                run = runs[min(done // max(cfg.training.steps, 1), len(runs) - 1)].name
                bar.update(task, completed=done, run=run,
                           total=len(runs) * cfg.training.steps)  # the grid may grow

            extend = (lambda rows, known: grid_extensions(cfg, rows, known)) if lr_sweep \
                else None
            rows = execute(config, set_ or [], runs, out, cfg.training.steps, advance, extend)
    except ConfigError as error:
        console.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2) from None
    csv_path, md_path, png = write_outputs(rows, out)
    console.print(md_path.read_text())
    console.print(f"every run: {csv_path}\ntable: {md_path}\nloss curves: {png}")
