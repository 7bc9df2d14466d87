"""Atomic checkpoints: a crash while writing leaves the previous checkpoint in force, and a
damaged checkpoint is never loaded.

Each checkpoint ``step_N.pt`` is written to a temporary file, flushed to disk and renamed
into place; then its record (step, size, SHA-256) is written beside it as ``step_N.json``
and named in ``latest.json``, each replaced atomically too. The last ``KEEP`` checkpoints
are kept. Loading tries the latest one first and refuses a file whose size or digest does
not match its record; if the latest is damaged it falls back, with a warning, to the newest
intact earlier one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

LATEST = "latest.json"
KEEP = 2


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, write) -> None:
    """Write ``path`` through a uniquely named temporary file in the same directory, flushed
    and renamed into place: readers see the old file or the whole new one, never a part,
    and two writers never share a temporary file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, record: dict) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(record).encode()))


def _write_failure(directory: Path, step: int, error: BaseException) -> CheckpointError:
    """What to tell the user when a checkpoint could not be written: why in words (torch
    says "[enforce fail at inline_container.cc] unexpected pos" for a full disk), and that
    the previous checkpoint is intact (the temporary file is removed, nothing renamed)."""
    errno = getattr(error, "errno", None)
    import errno as codes

    if errno == codes.ENOSPC:
        why = "the disk is full"
    elif errno == codes.EFBIG:
        why = "the file exceeds the file-size limit (ulimit -f)"
    elif errno == codes.EDQUOT:
        why = "the disk quota is exceeded"
    elif "unexpected pos" in str(error) or "write" in str(error).lower():
        why = "the disk is full or the file exceeds the file-size limit"
    else:
        why = f"{type(error).__name__}: {error}"
    previous = [r for r in _records(directory) if _intact(directory, r) is None]
    kept = (f"the previous checkpoint (step {previous[0]['step']}) is intact"
            if previous else "no earlier checkpoint exists")
    return CheckpointError(f"could not write the checkpoint of step {step} in {directory}: "
                           f"{why}; {kept}. Free space (or raise the limit), then resume "
                           "with --resume")


def remove_temporary_files(directory: Path) -> list[Path]:
    """Remove the temporary files a killed write left behind (``.<name>.<random>.tmp``)."""
    removed = []
    if directory.is_dir():
        for path in directory.glob(".*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    try:
        write_atomic(path, lambda f: torch.save(payload, f))
        record = {"step": step, "file": path.name, "bytes": path.stat().st_size,
                  "sha256": _sha256(path)}
        _write_json(path.with_suffix(".json"), record)
        _write_json(directory / LATEST, record)
    except (OSError, RuntimeError) as error:
        if not _is_recorded(directory, path):  # written, but never made the latest
            path.unlink(missing_ok=True)
        raise _write_failure(directory, step, error) from error
    for old in sorted(directory.glob("step_*.pt"))[:-KEEP]:
        old.unlink()
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def _is_recorded(directory: Path, path: Path) -> bool:
    return any(r.get("file") == path.name for r in _records(directory))


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds any checkpoint record (intact or not)."""
    return bool(_records(directory))


def _records(directory: Path) -> list[dict]:
    """Checkpoint records, newest first: ``latest.json``'s, then every kept one's."""
    records = []
    for path in [directory / LATEST, *sorted(directory.glob("step_*.json"), reverse=True)]:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record not in records:
            records.append(record)
    return records


def _intact(directory: Path, record: dict) -> str | None:
    """Why the checkpoint of ``record`` cannot be loaded, or ``None`` if it can."""
    try:
        path = directory / record["file"]
        if not path.exists():
            return f"{path} is missing"
        if path.stat().st_size != record["bytes"] or _sha256(path) != record["sha256"]:
            return f"{path} is incomplete or corrupted"
    except (KeyError, TypeError):
        return f"its record {record!r} is damaged"
    return None


def load_checkpoint(directory: Path) -> dict[str, Any]:
    """The newest intact checkpoint in ``directory`` (warning when that is not the latest)."""
    records = _records(directory)
    if not records:
        raise CheckpointError(f"no checkpoint in {directory} (missing {LATEST})")
    problems = []
    for record in records:
        problem = _intact(directory, record)
        if problem is None:
            if problems:
                warnings.warn(
                    f"{'; '.join(problems)}: not loading it; resuming from the previous intact "
                    f"checkpoint, step {record['step']}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return torch.load(directory / record["file"], weights_only=True)
        problems.append(problem)
    raise CheckpointError(f"no intact checkpoint in {directory}: {'; '.join(problems)}")
