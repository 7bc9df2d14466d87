"""Atomic checkpoints: a crash while writing leaves the previous checkpoint in force.

Each checkpoint is written to a temporary file, flushed to disk, renamed into place, and
only then named in ``latest.json`` (also replaced atomically) together with its size and
SHA-256. Loading reads ``latest.json`` and refuses a file whose digest does not match, so a
truncated or half-written checkpoint is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(directory: Path, step: int, payload: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    _write_atomic(path, lambda f: torch.save(payload, f))
    meta = {"step": step, "file": path.name, "bytes": path.stat().st_size,
            "sha256": _sha256(path)}
    _write_atomic(directory / LATEST, lambda f: f.write(json.dumps(meta).encode()))
    for old in sorted(directory.glob("step_*.pt"))[:-KEEP]:
        old.unlink()
    return path


def load_checkpoint(directory: Path) -> dict[str, Any]:
    latest = directory / LATEST
    if not latest.exists():
        raise CheckpointError(f"no checkpoint in {directory} (missing {LATEST})")
    meta = json.loads(latest.read_text())
    path = directory / meta["file"]
    if not path.exists() or path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupted; not loading it")
    return torch.load(path, weights_only=True)
