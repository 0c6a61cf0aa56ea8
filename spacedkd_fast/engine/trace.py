"""The JSONL training trace and batch checksums.

One JSON object per line, each with an ``event`` field:

- ``teacher_step`` (``n``, ``epoch``, ``key``, ``checksum``): a CE step of the teacher (or of the
  deepest exit in spaced self KD);
- ``record`` (``n``, ``key``, ``checksum``): a batch recorded without a CE step (the official
  self-KD trigger batch);
- ``student_step`` (``n``, ``key``, ``teacher_step``: the teacher steps taken when its soft targets
  were computed, ``checksum``; ``stream``: present for a batch of another data stream);
- ``replay_start`` (``teacher_step``, ``count``, ``reason``, ``rule``: the condition that fired it,
  e.g. ``n % I == 0``, ``(n - L) % I == 0``, ``space_counter >= L * s``, or the end of training)
  and ``replay_end``;
- ``flush`` (``replayed``, ``dropped``): the batches still pending when training ended.

A checksum is four float64 numbers computed on the batch's device::

    [sum(x), sum_i (i + 1) * sum(x[i]), sum(y), sum_i (i + 1) * y[i]]

The position-weighted sums make it sensitive to the order of samples inside a batch, which a plain
sum is not. Identical tensors on the same device give bit-identical checksums, so replay fidelity
can be checked from the trace alone by comparing numbers for equality.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

_WEIGHTS: dict[tuple[int, torch.device], Tensor] = {}


def _weights(n: int, device: torch.device) -> Tensor:
    """``[n, 2]`` float64: a column of ones and a column ``1..n``, cached per (n, device)
    (checksums run every step; cached tensors are never freed, as any stream may read them)."""
    key = (n, device)
    w = _WEIGHTS.get(key)
    if w is None:
        pos = torch.arange(1, n + 1, device=device, dtype=torch.float64)
        w = torch.stack([torch.ones_like(pos), pos], dim=1)
        if len(_WEIGHTS) < 16:
            _WEIGHTS[key] = w
    return w


def batch_checksum(x: Tensor, y: Tensor) -> Tensor:
    """Float64 digest ``[4]`` of a batch ``x: [B, ...]``, ``y: [B, ...]``, on their device:
    ``[sum(x), sum_i (i+1) sum(x[i]), sum(y), sum_i (i+1) sum(y[i])]`` from one small matmul.

    No host synchronisation: the caller decides when (and whether) to read it.
    """
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(f"a batch needs a leading batch dimension, got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and "
                         f"{y.shape[0]}")
    b = x.shape[0]
    # row sums accumulated in float64 directly (no float64 copy of the batch)
    rows = torch.stack([x.detach().reshape(b, -1).sum(dim=1, dtype=torch.float64),
                        _to_device(y.detach().reshape(b, -1), x.device).sum(dim=1,
                                                                            dtype=torch.float64)])
    return (rows @ _weights(b, x.device)).reshape(4)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device)


class TraceWriter:
    """Appends JSON events to ``path``; opened lazily, flushed after each line.

    ``resume_lines``: when resuming, the file is cut back to its first ``resume_lines`` lines (the
    events written before the checkpoint) so that an interrupted-then-resumed run leaves the same
    file as an uninterrupted one. A fresh run (``None``) truncates the file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.lines = 0
        self._file = None
        self._resume_lines: int | None = None

    def resume_from(self, lines: int) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._resume_lines = int(lines)
        self.lines = int(lines)

    def _open(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        if self._resume_lines is None:
            self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 (held open)
            return
        kept: list[str] = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if i >= self._resume_lines:
                        break
                    kept.append(line)
        if len(kept) != self._resume_lines:
            raise RuntimeError(
                f"cannot resume trace {self.path}: the checkpoint says it held {self._resume_lines} "
                f"events, the file has {len(kept)}"
            )
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        self._file.writelines(kept)

    def write(self, event: str, **fields: Any) -> None:
        if self._file is None:
            self._open()
        self._file.write(json.dumps({"event": event, **fields}) + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_trace(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All events of a trace file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def iter_events(events: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    """The events of one kind, in order."""
    return (e for e in events if e["event"] == kind)
