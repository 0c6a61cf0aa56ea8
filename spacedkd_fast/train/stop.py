"""Stopping a run cleanly: SIGTERM (what cluster schedulers and torchrun's agent send before
stopping a job) and, in the trainer's own process, the first Ctrl-C (SIGINT) ask the loop to save
and stop after the current step.

The signal handler only sets a flag; the loop reads it at points where the state is consistent
(between steps), saves a checkpoint and stops; the process then exits with 128 + the signal number
(130 for SIGINT, 143 for SIGTERM). A second Ctrl-C aborts at once. A repeated SIGTERM does not:
under a scheduler it often comes twice (SLURM signals every process of the job step, torchrun's
agent then passes it on to its workers), and the run must still save.

Whose signals these are: the handlers live only for the run (installed on entering the
``StopRequest``, the previous ones put back on leaving it, whatever happens), and only in the main
thread (Python delivers signals there alone). SIGINT is taken only when the process is the
trainer's command (``python -m spacedkd_fast.train``, which calls :func:`claim_process`) and
nobody else has claimed Ctrl-C (the handler is still Python's ``default_int_handler``). A run
started in-process by other code (a test runner, a notebook, an application) leaves Ctrl-C to that
code: the ``KeyboardInterrupt`` goes to it, as it would without the trainer.
"""

from __future__ import annotations

import signal
import sys
import threading

_PROCESS_IS_OURS = False


def claim_process() -> None:
    """Declare this process the trainer's command (called by ``spacedkd_fast.train.__main__``)."""
    global _PROCESS_IS_OURS
    _PROCESS_IS_OURS = True


def owns_sigint() -> bool:
    """Whether a run in this process turns Ctrl-C into a clean stop (see the module text)."""
    return (_PROCESS_IS_OURS and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)


class StopRequest:
    """Context manager that turns SIGTERM (and SIGINT when :func:`owns_sigint`) into a request
    the loop polls (``.requested``)."""

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

    def signals(self) -> tuple[int, ...]:
        """The signals this run takes (none outside the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return ()
        return (signal.SIGINT, signal.SIGTERM) if owns_sigint() else (signal.SIGTERM,)

    def __enter__(self) -> StopRequest:
        try:
            for sig in self.signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:  # the user insists
                raise KeyboardInterrupt
            return  # the same stop, asked again by someone else
        self.signum = signum
        again = " (Ctrl-C again aborts)" if signum == signal.SIGINT else ""
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after the current step"
              f"{again}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
