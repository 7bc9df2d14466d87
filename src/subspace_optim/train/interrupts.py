"""Ctrl-C and SIGTERM during training, deferred to a step boundary.

A KeyboardInterrupt raised while parameters are being updated (inside ``optimizer.step()``,
or inside backward in layer-wise mode) would leave some parameters stepped and others not;
a checkpoint written then is stamped with the old step, and the resumed run applies those
updates twice. So the first Ctrl-C only asks the loop to stop once the step in progress is
complete; the loop then checkpoints and ends. A second Ctrl-C stops at once, without
saving: the last checkpoint stays in force.

SIGTERM, what cluster schedulers (Slurm, Kubernetes) send before they kill a job, is taken
the same way: save at the next step boundary, then end with exit status 143 (128 + 15, the
status of a process ended by SIGTERM). A second SIGTERM stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading


class DeferredInterrupt:
    """Context manager: ``requested`` turns true at the first SIGINT or SIGTERM, and
    ``signal`` says which (the exit status is 128 plus its number)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal = signum
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step and "
                         f"saving a checkpoint ({again} again to stop at once, without "
                         "saving)\n")

    @property
    def exit_status(self) -> int:
        return 128 + (self.signal or signal.SIGINT)

    def __enter__(self) -> DeferredInterrupt:
        # Signal handlers can only be installed from the main thread; elsewhere the
        # signals keep Python's default behaviour.
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
