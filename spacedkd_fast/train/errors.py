"""Exit statuses of ``python -m spacedkd_fast.train`` and the exceptions that map onto them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130


class UserError(RuntimeError):
    """Input the run cannot use (unknown model or data set, unwritable folder, ...)."""


class Interrupted(Exception):
    """A stop was requested (Ctrl-C); raised by the loop once the state is saved."""
