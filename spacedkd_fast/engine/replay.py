"""Replay records: what the engine keeps between a teacher step and the student's replay of it.

- :class:`KeyedReplay` keeps only the key and a 4-number checksum per batch and asks a
  :class:`~spacedkd_fast.engine.source_protocol.ReplayableSource` for the batch again (pixel-free).
- :class:`CopyReplay` keeps a copy of every batch it is handed (on a device and in a dtype the user
  picks), for sources that cannot regenerate a batch. This is what the official code does
  (float32 pixels on the host).

A replay asks its buffer for the run of batches of all its records at once (``fetch_run``), so a
source that loads ahead (``batches(keys)``, e.g. a ``KeyedLoader``'s worker pool) streams the
replay at the speed of a first pass instead of one ``batch(key)`` at a time.

Byte accounting (``bytes_held`` / ``bytes_per_sample``) counts what a buffer holds for its pending
batches: 8 bytes per key, the checksum tensor, and for ``CopyReplay`` the stored tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ReplayMismatchError
from .source_protocol import Batch, ReplayableSource

KEY_BYTES = 8  # a key is an int; count it as an int64

#: What a keyed replay's checksum mismatch most likely means, and the way out (one line).
MISMATCH_CAUSE = (
    "likely cause: randomness the source does not key, e.g. a transform drawing from its own "
    "np.random.Generator, random.Random, torch.Generator or a CUDA generator instead of "
    "torch's, numpy's and Python's global generators (which KeyedLoader seeds per sample); "
    "make the transform draw from those, or fall back to CopyReplay (source=None: the engine "
    "keeps copies of the batches, at the cost of their bytes)")


@dataclass(slots=True)
class Record:
    """One pending batch: its key, batch size, checksum (teacher side: four float64 numbers, as a
    host tuple when the teacher step read them anyway, else a ``[4]`` device tensor; ``None``
    when nothing will read it: a ``CopyReplay`` without a trace) and, for ``CopyReplay``, the
    stored batch."""

    key: Any
    size: int
    checksum: Tensor | tuple[float, ...] | None
    batch: Batch | None = None

    def nbytes(self) -> int:
        n = KEY_BYTES
        if isinstance(self.checksum, Tensor):
            n += self.checksum.numel() * self.checksum.element_size()
        elif self.checksum is not None:
            n += 8 * len(self.checksum)
        if self.batch is not None:
            n += sum(t.numel() * t.element_size() for t in self.batch)
        return n


class _ReplayBuffer:
    """Common bookkeeping: an ordered list of pending records."""

    #: whether a replayed batch can differ from the recorded one, so must be checked by checksum
    verifies: bool = False

    def __init__(self) -> None:
        self.pending: list[Record] = []

    def __len__(self) -> int:
        return len(self.pending)

    def record(self, key: Any, x: Tensor, y: Tensor, checksum: Tensor | tuple | None) -> None:
        raise NotImplementedError

    def fetch(self, rec: Record) -> Batch:
        raise NotImplementedError

    def fetch_run(self, records: list[Record]) -> Iterator[Batch]:
        """The batches of ``records``, in order (a replay's whole run at once)."""
        return (self.fetch(rec) for rec in records)

    def take(self, count: int | None = None) -> list[Record]:
        """Remove and return the oldest ``count`` records (all when ``None``)."""
        count = len(self.pending) if count is None else count
        out, self.pending = self.pending[:count], self.pending[count:]
        return out

    @property
    def samples_held(self) -> int:
        return sum(r.size for r in self.pending)

    def bytes_held(self) -> int:
        """Bytes held for the pending batches (keys, checksums, stored tensors)."""
        return sum(r.nbytes() for r in self.pending)

    def bytes_per_sample(self) -> float:
        samples = self.samples_held
        return self.bytes_held() / samples if samples else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "keys": [r.key for r in self.pending],
            "sizes": [r.size for r in self.pending],
            "checksums": [r.checksum.cpu() if isinstance(r.checksum, Tensor) else r.checksum
                          for r in self.pending],
            "batches": [None if r.batch is None else tuple(t.cpu() for t in r.batch)
                        for r in self.pending],
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None
                        ) -> None:
        self.pending = []
        for key, size, cs, batch in zip(state["keys"], state["sizes"], state["checksums"],
                                        state["batches"]):
            if batch is not None:
                batch = tuple(t.to(self._store_device(t, device)) for t in batch)
            if isinstance(cs, Tensor):
                cs = cs.to(device or "cpu")
            elif cs is not None:
                cs = tuple(float(v) for v in cs)
            self.pending.append(Record(key, int(size), cs, batch))

    def _store_device(self, t: Tensor, default):
        return default or t.device


class KeyedReplay(_ReplayBuffer):
    """Pixel-free replay: keeps ``(key, checksum)``; ``fetch`` asks ``source.batch(key)``."""

    verifies = True

    def __init__(self, source: ReplayableSource) -> None:
        super().__init__()
        if not callable(getattr(source, "batch", None)):
            raise TypeError(
                f"source must be a ReplayableSource with a batch(key) method, got {type(source)!r}"
            )
        self.source = source

    def record(self, key: Any, x: Tensor, y: Tensor, checksum: Tensor | tuple | None) -> None:
        if checksum is None:
            raise ValueError("keyed replay needs the batch checksum to verify the replay")
        self.pending.append(Record(key, int(x.shape[0]), checksum))

    def fetch(self, rec: Record) -> Batch:
        return self.source.batch(rec.key)

    def fetch_run(self, records: list[Record]) -> Iterator[Batch]:
        """The batches of ``records`` in order: through the source's ``batches(keys)`` when its
        class defines one (loaded ahead), else one ``batch(key)`` at a time. A wrapper that
        forwards attributes to an inner source (``__getattr__``) is asked ``batch(key)``: the
        inner ``batches`` would skip what the wrapper does to a batch."""
        if getattr(type(self.source), "batches", None) is None:
            return super().fetch_run(records)
        return iter(self.source.batches([rec.key for rec in records]))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["batches"] = [None] * len(self.pending)
        return state


class CopyReplay(_ReplayBuffer):
    """Keeps a copy of each batch it is handed: for sources that cannot regenerate batches.

    ``device``: where copies live (default: where the batch is; ``"cpu"`` mimics the official
    host buffer). ``dtype``: storage dtype for floating-point inputs (e.g. ``torch.float16`` halves
    the bytes; the student then replays the rounded values, which the trace's checksums show).
    Labels are stored as given. Costs ``x.nbytes + y.nbytes`` per batch.
    """

    def __init__(self, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype

    def record(self, key: Any, x: Tensor, y: Tensor, checksum: Tensor | tuple | None) -> None:
        dtype = self.dtype if (self.dtype is not None and x.is_floating_point()) else x.dtype
        xs = x.detach().to(device=self.device or x.device, dtype=dtype, copy=True)
        ys = y.detach().to(device=self.device or y.device, copy=True)
        self.pending.append(Record(key, int(x.shape[0]), checksum, (xs, ys)))

    def fetch(self, rec: Record) -> Batch:
        assert rec.batch is not None
        return rec.batch

    def _store_device(self, t: Tensor, default):
        return self.device or default or t.device


@contextlib.contextmanager
def mismatch_explained(buffer: _ReplayBuffer) -> Iterator[None]:
    """A keyed replay's :class:`ReplayMismatchError` raised inside gets :data:`MISMATCH_CAUSE`
    appended (its likely cause and the ``CopyReplay`` fallback; still one line)."""
    try:
        yield
    except ReplayMismatchError as exc:
        msg = str(exc)
        if not isinstance(buffer, KeyedReplay) or MISMATCH_CAUSE in msg:
            raise
        raise ReplayMismatchError(f"{msg}; {MISMATCH_CAUSE}", key=exc.key, expected=exc.expected,
                                  got=exc.got) from exc
