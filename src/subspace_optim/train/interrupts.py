"""Ctrl-C during training, deferred to a step boundary.

A KeyboardInterrupt raised while parameters are being updated (inside ``optimizer.step()``,
or inside backward in layer-wise mode) would leave some parameters stepped and others not;
a checkpoint written then is stamped with the old step, and the resumed run applies those
updates twice. So the first Ctrl-C only asks the loop to stop once the step in progress is
complete; the loop then checkpoints and ends. A second Ctrl-C stops at once, without
saving: the last checkpoint stays in force.
"""

from __future__ import annotations

import signal
import sys
import threading


class DeferredInterrupt:
    """Context manager: ``requested`` turns true at the first SIGINT."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nstopping after this step and saving a checkpoint "
                         "(Ctrl-C again to stop at once, without saving)\n")

    def __enter__(self) -> DeferredInterrupt:
        # Signal handlers can only be installed from the main thread; elsewhere Ctrl-C
        # keeps Python's default behaviour.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
