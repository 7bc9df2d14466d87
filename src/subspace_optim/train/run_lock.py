"""One training process per run directory.

Two ``subspace-optim train`` processes with the same ``output.name`` (or a ``--resume`` of a
run that is still going) would both write ``metrics.jsonl`` and the checkpoints, each
record twice and the first run's results lost. The process that trains a run holds an
exclusive lock on ``<run>/.lock`` (``flock``, released by the kernel when the process ends,
however it ends) with its PID written inside; another is refused with that PID.
"""

from __future__ import annotations

import os
from pathlib import Path

from .config import ConfigError

try:
    import fcntl
except ImportError:  # not POSIX: no lock (a documented limit)
    fcntl = None


class RunLock:
    """Holds ``<run_dir>/.lock`` until :meth:`release` (or the process's end)."""

    NAME = ".lock"

    def __init__(self, run_dir: Path) -> None:
        self.fd: int | None = None
        if fcntl is None:
            return
        path = run_dir / self.NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"{run_dir} is in use by another subspace-optim train (PID {holder}); wait "
                "for it to end, or give this run another output.name") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
