"""Stopping a run cleanly: the first Ctrl-C (SIGINT) or SIGTERM (what cluster schedulers send
before preempting a job) asks the loop to save and stop after the current step.

The signal handler only sets a flag; the loop reads it at points where the state is consistent
(between steps), saves a checkpoint and stops; the process then exits with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM). A second signal aborts at once.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a request the loop polls (``.requested``)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step "
              "(send it again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
