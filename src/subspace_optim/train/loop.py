"""The training loop of ``subspace-optim train``."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import grads
from ..layerwise import step_in_backward
from ..memory import optimizer_state_bytes
from . import dist_checkpoint, parallel
from .checkpoint import (
    has_checkpoint,
    load_checkpoint,
    remove_temporary_files,
    save_checkpoint,
    write_atomic,
)
from .config import ConfigError, RunConfig
from .data import prepare
from .interrupts import DeferredInterrupt
from .model import build_model, build_optimizer
from .run_lock import RunLock

OOM_ADVICE = (
    "out of memory. Settings that lower memory: a smaller optimizer.group.rank, "
    "optimizer.name=GaLoreAdamW8bit (8-bit states), training.layerwise=true (no full "
    "gradient), training.int8_weights=true, training.activation_checkpointing=true, a "
    "smaller training.batch_size with more training.accumulation_steps, training.dtype=bf16"
)


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` at the last step."""
    t = cfg.training
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine


def token_losses(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over the batch, number of predicted tokens)."""
    logits = model(input_ids=batch[:, :-1]).logits
    targets = batch[:, 1:]
    # At least fp32 (bf16 logits), never below the model's precision (fp64 runs).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum")
    return loss, targets.numel()


@torch.no_grad()
def evaluate(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int, batches: int,
             device: torch.device, autocast) -> tuple[float, float]:
    """Validation loss and perplexity exp(total token loss / token count) over the first
    ``batches`` batches (every token weighs the same; no off-by-one in the count)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(min(batches, math.ceil(sequences.shape[0] / batch_size))):
        chunk = sequences[i * batch_size : (i + 1) * batch_size].to(device)
        with autocast():
            loss, n = token_losses(model, chunk)
        total += loss.item()
        count += n
    model.train(was_training)
    mean = total / count
    return mean, math.exp(mean)


def _device(cfg: RunConfig) -> torch.device:
    if cfg.training.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.training.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"training.device={cfg.training.device}, but CUDA is not available "
                          "on this machine (use cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"training.device={cfg.training.device}, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"training.device={cfg.training.device}, but MPS is not available")
    return device


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    first_val_ppl: float
    final_val_ppl: float
    interrupted: bool = False
    # Steps in which skip_nonfinite skipped at least one parameter (NaN or inf gradient).
    skipped_steps: int = 0
    # Set when --resume found the run already at its last step: nothing was trained.
    already_finished: bool = False
    # The exit status of an interrupted run: 130 (SIGINT) or 143 (SIGTERM).
    exit_status: int = 130
    # The per-parameter table of the optimizer's state at the end (``verbose``).
    state_table: str | None = None


def run_directory(cfg: RunConfig, config_name: str) -> Path:
    """Where a new run writes (created by :func:`train` once the run is ready to start).
    Checked here, before any data or model is prepared: ``output.dir`` must be a directory
    (or not exist yet) and the run's name must fit the filesystem."""
    name = cfg.output.name or f"{config_name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    out = Path(cfg.output.dir)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output.dir={cfg.output.dir!r}: {parent} is a file, not a "
                                  "directory")
            if not os.access(parent, os.W_OK):
                raise ConfigError(f"output.dir={cfg.output.dir!r}: {parent} is not writable")
            limit = os.pathconf(parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
            break
    else:
        limit = 255
    if len(name.encode()) > limit:
        raise ConfigError(f"output.name is {len(name.encode())} bytes long; the filesystem "
                          f"takes names of at most {limit}")
    path = out / name
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run directory")
    if (path / "checkpoints").exists() or (path / "config.json").exists():
        raise ConfigError(f"{path} already holds a run; resume it with --resume {path}")
    return path


def _new_window() -> dict[str, float]:
    """The running sums of one logging window; saved in checkpoints, so that a resumed run
    logs exactly the records the uninterrupted run logs."""
    return {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0, "skipped": 0,
            "refreshes": 0}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint at ``step`` (a run killed after a log line
    but before its next checkpoint): the resumed run writes them again. A last line cut
    short (a full disk, a kill during the write) is dropped too; a damaged line before it is
    refused with its number (the file is not the run's own log)."""
    if not path.exists():
        return
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = record["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            if all(not rest.strip() for rest in lines[number:]):
                break  # the last line, cut short: the resumed run writes it again
            raise ConfigError(f"{path}: line {number} is damaged ({error}); repair or remove "
                              "that line to resume") from None
        if record_step <= step:
            kept.append(line)
    write_atomic(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def _check_resumed_config(cfg: RunConfig, saved: dict | None, run_dir: Path) -> None:
    """The run's configuration (its ``config.json`` with ``--set`` applied) must equal the
    one its checkpoint was saved with, but for the keys that may change on resume: an edit
    of ``config.json`` is judged as ``--set`` would be."""
    from .config import RESUMABLE_KEYS, flatten

    if saved is None:  # checkpoints of older releases did not store it
        return
    # Compared as JSON values (config.json's form: tuples are lists there).
    now, then = (flatten(json.loads(json.dumps(d))) for d in (cfg.to_dict(), saved))
    changed = [(key, then.get(key), now.get(key)) for key in sorted(set(now) | set(then))
               if now.get(key) != then.get(key) and key not in RESUMABLE_KEYS]
    if changed:
        said = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed)
        raise ConfigError(
            f"{run_dir / 'config.json'} differs from the configuration its checkpoint was "
            f"saved with ({said}); a resumed run continues the same run, so only "
            f"{', '.join(RESUMABLE_KEYS)} may change (put the file back, or start a new run)")


def train(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          stop_after: int | None = None, say=None, verbose: bool = False) -> RunResult:
    """Train as ``cfg`` says, writing into ``run_dir``. ``stop_after`` ends the run after that
    many steps with a checkpoint, as an interruption would (used by tests).

    Ctrl-C is deferred to the end of the step in progress, which is then checkpointed (so a
    checkpoint never holds a half-applied step); a second Ctrl-C stops at once without
    saving; SIGTERM is taken the same way (exit status 143). A run that fails or is
    stopped before its first step leaves no directory. ``say``: where to print notices
    (resuming from step N). One process trains a run directory at a time (a lock).
    ``verbose``: the result carries the per-parameter table of the optimizer's state."""
    say = say or (lambda message: None)
    par = parallel.setup(cfg)
    existed = run_dir.exists()
    lock = None
    if par.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock = RunLock(run_dir)
        except ConfigError:
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        remove_temporary_files(run_dir)
        remove_temporary_files(run_dir / "checkpoints")
    try:
        return _train(cfg, run_dir, resume, progress, stop_after, say, par, existed, verbose)
    except BaseException:
        # Failed before anything was saved (data, model, a bad checkpoint): leave no
        # directory that was not there.
        if par.main and not existed and not has_checkpoint(run_dir / "checkpoints"):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, run_dir: Path, resume: bool, progress: bool,
           stop_after: int | None, say, par, existed: bool, verbose: bool) -> RunResult:
    t = cfg.training
    ckpt = None
    if resume:
        if not has_checkpoint(run_dir / "checkpoints"):
            say(f"{run_dir} has no checkpoint yet (stopped before its first one): starting "
                "it again from step 0")
            resume = False
            if par.main:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        else:
            ckpt = load_checkpoint(run_dir / "checkpoints")
            _check_resumed_config(cfg, ckpt.get("config"), run_dir)
    device = parallel.device(par, _device(cfg))
    torch.manual_seed(t.seed)
    if par.main:
        tok, batches, val = prepare(cfg.data, t.seed, t.batch_size)
    parallel.barrier(par)  # rank 0 has written the token cache: the others read it
    if not par.main:
        tok, batches, val = prepare(cfg.data, t.seed, t.batch_size)
    model = build_model(cfg, tok.get_vocab_size())
    if t.dtype in ("bf16", "fp64"):
        model = model.to(torch.bfloat16 if t.dtype == "bf16" else torch.float64)
    model = model.to(device)
    wrapped, ddp = parallel.wrap(par, model)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    forward_model = torch.compile(wrapped) if t.compile else wrapped

    def autocast():
        if t.dtype == "autocast":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    step, history, window = 0, {"val": [], "skipped_steps": 0}, _new_window()
    if resume:
        step = ckpt["step"]
        if step >= t.steps:
            return RunResult(run_dir, step, ckpt["history"]["val"][0]["val_ppl"],
                             ckpt["history"]["val"][-1]["val_ppl"],
                             skipped_steps=ckpt["history"].get("skipped_steps", 0),
                             already_finished=True)
        if par.distributed:
            dist_checkpoint.load(run_dir / "checkpoints", model, optimizer)
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        history = {"skipped_steps": 0, **ckpt["history"]}
        window = ckpt.get("window", window)
        if par.main:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
        if step < t.steps:
            say(f"resuming from step {step} of {t.steps}")
    # After a resume's load: DCP's loading steps a fresh optimizer once (at lr 0) to create
    # its state, which layer-wise hooks would turn into a no-op.
    stepper = None
    if t.layerwise:
        stepper = step_in_backward(optimizer, t.accumulation_steps,
                                   max_grad_norm=t.max_grad_norm, ddp=ddp)
    created = not resume and not existed
    if par.main and not resume:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    parallel.barrier(par)
    start = step

    def checkpoint() -> None:
        rest = {"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                "step": step, "history": history, "window": window, "config": cfg.to_dict(),
                "world_size": par.world}
        if par.distributed:
            dist_checkpoint.save(run_dir / "checkpoints", step, rest, model, optimizer, par)
            return
        save_checkpoint(run_dir / "checkpoints", step, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), **rest})

    def evaluate_now() -> None:
        loss, ppl = evaluate(forward_model, val, t.batch_size, t.eval_batches, device, autocast)
        history["val"].append({"step": step, "val_loss": loss, "val_ppl": ppl})
        _log(metrics, {"step": step, "val_loss": loss, "val_ppl": ppl})

    def log_window(grad_norm) -> None:
        # Tokens of the global batch: every rank counts its own slice.
        tokens_per_s = window["tokens"] * par.world / max(window["seconds"], 1e-9)
        _log(metrics, {
            "step": step, "loss": window["loss"] / window["steps"],
            "lr": float(scheduler.get_last_lr()[-1]),  # a tensor for some optimizers (torchao)
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "skipped_steps": window["skipped"],
            "refreshes": window.get("refreshes", 0),
            "tokens_per_s": tokens_per_s,
            "peak_memory_bytes": _peak_memory(device),
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        })
        bar.tokens_per_s = tokens_per_s
        window.update(_new_window())
        speed.observe(tokens_per_s)

    speed = _Throughput(device, say)
    interrupted, exit_status = False, 130
    try:
        metrics_path = run_dir / "metrics.jsonl" if par.main else Path(os.devnull)
        with open(metrics_path, "a") as metrics, DeferredInterrupt() as interrupt:
            bar = _Progress(t.steps, step, enabled=progress and par.main)
            try:
                if not history["val"]:
                    evaluate_now()
                end = t.steps if stop_after is None else min(t.steps, step + stop_after)
                # A Ctrl-C seen by any rank stops every rank after the same step.
                while step < end and not parallel.any_rank(par, interrupt.requested):
                    began = time.perf_counter()
                    # (Optimizers of other packages, compared by module:Class, count none.)
                    skips = getattr(optimizer, "nonfinite_skips", 0)
                    refreshes = getattr(optimizer, "refresh_count", 0)
                    loss_sum = 0.0
                    for micro in range(t.accumulation_steps):
                        batch = parallel.local_batch(
                            par, batches[step * t.accumulation_steps + micro]).to(device)
                        with autocast():
                            loss, n = token_losses(forward_model, batch)
                        mean = loss / n
                        (mean / t.accumulation_steps).backward()
                        loss_sum += mean.item() / t.accumulation_steps
                        window["tokens"] += n
                    loss_sum = parallel.mean_over_ranks(par, loss_sum)
                    if stepper is None:
                        # INT8 weights keep their gradient outside .grad: clipped and counted
                        # by the library's clip (one process; FSDP2 clips DTensors).
                        clip = torch.nn.utils.clip_grad_norm_ if par.distributed else \
                            grads.clip_grad_norm_
                        grad_norm = (parallel.full_norm(clip(
                            model.parameters() if par.distributed else optimizer,
                            t.max_grad_norm)) if t.max_grad_norm else None)
                        optimizer.step()
                    else:
                        optimizer.step()  # closes the step: parameters already moved
                        grad_norm = stepper.grad_norm
                    optimizer.zero_grad()
                    scheduler.step()
                    step += 1
                    skipped = getattr(optimizer, "nonfinite_skips", 0) > skips
                    history["skipped_steps"] += skipped
                    window["skipped"] += skipped
                    window["refreshes"] = (window.get("refreshes", 0)
                                           + getattr(optimizer, "refresh_count", 0) - refreshes)
                    window["loss"] += loss_sum
                    window["steps"] += 1
                    window["seconds"] += time.perf_counter() - began
                    bar.update(step, loss_sum)
                    if step % t.log_every == 0 or step == t.steps:
                        log_window(grad_norm)
                    if step % t.eval_every == 0 or step == t.steps:
                        evaluate_now()
                    if step % t.checkpoint_every == 0 and step < end:
                        checkpoint()
                interrupted = interrupt.requested or step < t.steps
                exit_status = interrupt.exit_status
            except torch.cuda.OutOfMemoryError:
                raise SystemExit(f"CUDA {OOM_ADVICE}") from None
            finally:
                bar.close()
    except BaseException:
        if created and step == start and par.main:  # nothing trained: leave no empty run
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if step > start:
        checkpoint()
    elif created and par.main:  # stopped before the first step
        shutil.rmtree(run_dir, ignore_errors=True)
    if stepper is not None:
        stepper.remove()
    table = None
    if verbose:
        from ..report import state_report

        table = str(state_report(optimizer, model))
    return RunResult(run_dir, step, history["val"][0]["val_ppl"], history["val"][-1]["val_ppl"],
                     interrupted, history["skipped_steps"], exit_status=exit_status,
                     state_table=table)


class _Throughput:
    """Says, once, when a run's throughput falls far below what the machine did in the
    run's first logging windows: on a shared CPU another process competes for the cores,
    and torch's threads then spin against it (measured on a 2-core machine: 644 against
    8,929 tokens/s with one thread). The first window (compilation, caches) is not taken as
    the reference."""

    FALL = 1 / 3

    def __init__(self, device: torch.device, say) -> None:
        self.device, self.say = device, say
        self.seen: list[float] = []
        self.said = False

    def observe(self, tokens_per_s: float) -> None:
        self.seen.append(tokens_per_s)
        reference = max(self.seen[1:-1], default=None)
        if self.said or reference is None or tokens_per_s >= self.FALL * reference:
            return
        self.said = True
        advice = ""
        if self.device.type == "cpu":
            threads = torch.get_num_threads()
            advice = (f"; another process may share the CPU: with {threads} torch thread(s) "
                      f"on {os.cpu_count()} core(s), fewer threads can be much faster "
                      "(OMP_NUM_THREADS=1 subspace-optim train ..., or "
                      "torch.set_num_threads(1))")
        self.say(f"throughput fell to {tokens_per_s:,.0f} tokens/s from {reference:,.0f} "
                 f"earlier in this run{advice}")


def _log(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record) + "\n")
    handle.flush()


class _Progress:
    """A rich progress bar with the live loss and throughput (nothing when disabled)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.tokens_per_s = 0.0
        self._bar = None
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("loss {task.fields[loss]:.4f}"),
                             TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeRemainingColumn())
        self._task = self._bar.add_task("train", total=total, completed=start, loss=float("nan"),
                                        tps=0.0)
        self._bar.start()

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, tps=self.tokens_per_s)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
