"""Errors the engine raises while training (bad arguments are plain ``ValueError`` /
``TypeError``)."""

from __future__ import annotations

from typing import Any


class NonFiniteLossError(RuntimeError):
    """A loss was NaN or infinite; raised before the optimizer step that would have applied it.

    ``step``: the step count of that model (teacher steps or student steps, 1-based) whose update
    was refused; ``role``: ``"teacher"`` or ``"student"``; ``key``: the batch key.
    """

    def __init__(self, message: str, *, step: int, role: str, key: Any = None) -> None:
        super().__init__(message)
        self.step, self.role, self.key = step, role, key


class ReplayMismatchError(RuntimeError):
    """A replayable source gave back a batch whose checksum differs from the recorded one."""

    def __init__(self, message: str, *, key: Any, expected: list[float], got: list[float]) -> None:
        super().__init__(message)
        self.key, self.expected, self.got = key, expected, got
