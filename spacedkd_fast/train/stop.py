"""Stopping a run cleanly: the first Ctrl-C asks the loop to save and stop after the current step.

The signal handler only sets a flag; the loop reads it at points where the state is consistent
(between steps), saves a checkpoint and stops. A second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import sys
import threading


class StopRequest:
    """Context manager that turns SIGINT into a request the loop polls (``.requested``)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint after the current step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
