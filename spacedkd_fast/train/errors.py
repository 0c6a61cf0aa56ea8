"""Exit statuses of ``python -m spacedkd_fast.train`` and the exceptions that map onto them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C); SIGTERM gives 143 (128 + the signal number)
EXIT_WRITE_FAILED = 4  # an output file could not be written (disk full, permission lost)


class UserError(RuntimeError):
    """Input the run cannot use (unknown model or data set, unwritable folder, ...)."""


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); raised by the loop once the state is saved."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not one of ours; the message says which."""


def is_bad_input(err: BaseException) -> bool:
    """An error of the layers below the trainer that reports bad input in one line: marked
    ``bad_input`` (the data layer's ``BadDataError``, e.g. a bad item a loader worker met
    mid-run), or the engine's ``ReplayMismatchError`` (a data set whose transforms draw from
    randomness the keyed loader does not seed: it names the key, the cause and the fallback).
    Torch-free: the engine is looked up only if it was loaded."""
    if getattr(err, "bad_input", False):
        return True
    import sys

    engine_errors = sys.modules.get("spacedkd_fast.engine.errors")
    return engine_errors is not None and isinstance(err, engine_errors.ReplayMismatchError)


def resume_folder_error(folder) -> CheckpointError | None:
    """The error of ``--resume FOLDER`` when FOLDER is not a folder at all (torch-free, so that
    the CLI answers at once), else ``None``."""
    from pathlib import Path

    if Path(folder).is_dir():
        return None
    return CheckpointError(f"cannot resume: {folder} is not a folder (give the --out folder of an "
                           "earlier run)")
