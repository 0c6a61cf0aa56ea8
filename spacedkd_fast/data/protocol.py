"""The replayable-source protocol as the data layer implements it (every source in this package).

A *key* names one training batch: the global step ``n = key(epoch, i) >= 1`` of batch ``i`` of
``epoch`` (both 0-based). The formula lives in :mod:`spacedkd_fast.data.keyed` only; callers
outside ``data/`` never compute a key, they ask the source:

- ``steps_per_epoch``: ``L``, batches per epoch (the last partial batch counts unless the source
  was built with ``drop_last``).
- ``epoch(e, start=0)``: yields ``(key, (x, y))`` for batches ``start .. L-1`` of epoch ``e``.
  ``start > 0`` is a mid-epoch resume: the same keys and tensors an uninterrupted epoch yields
  from there on (``start == L`` yields nothing).
- ``batch(key)``: the identical ``(x, y)`` again, at any time, in any order (bit-identical on the
  same device).
- ``key(e, i)`` and ``locate(key) -> (e, i)``: the key scheme, both ways. A key that is not an
  int >= 1 raises ``InvalidKeyError`` (both a ``ValueError`` and a ``KeyError``).
- ``keys(e, start=0)``: the ``range`` of keys ``epoch(e, start)`` will yield.
- ``batches(keys)``: the batches of ``keys`` in order, each equal to ``batch(key)``, loaded ahead
  where the source can (a look-ahead thread, a ``KeyedLoader``'s worker pool): the engine asks
  for one replay's whole run of keys at once, so a replay streams at the speed of a first pass.
- ``stream(s)`` and ``stream_id``: **data streams**. ``stream(0)`` is the training stream (the
  source itself). ``stream(s)`` for ``s >= 1`` is a view of the *same data* whose epoch
  permutations and augmentation draws are independent of every other stream's (the tags of
  :mod:`.keyed` are moved by the stream number); it has the same ``L`` and the same key scheme,
  and it is keyed like stream 0, so ``stream(s).batch(key)`` regenerates its batch exactly on
  resume. Keys do not say which stream they came from: a caller that draws from two streams keeps
  them apart (e.g. one replay record per stream). The official ViT loop's ``space_loader`` (a
  second, independently shuffled loader over the same training set, a fresh shuffle per pass)
  is ``source.stream(1)``, its pass ``p`` is ``source.stream(1).epoch(p)``.

Stream 0 of every source draws exactly what it drew before streams existed, so recorded keys and
the engine's bitwise tests keep their values.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol, runtime_checkable

from torch import Tensor

Batch = tuple[Tensor, Tensor]


@runtime_checkable
class StreamedSource(Protocol):
    """What every source of ``spacedkd_fast.data`` provides (see the module docstring)."""

    steps_per_epoch: int

    @property
    def stream_id(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]: ...

    def batch(self, key: int) -> Batch: ...

    def key(self, epoch: int, i: int) -> int: ...

    def locate(self, key: int) -> tuple[int, int]: ...

    def keys(self, epoch: int, start: int = 0) -> range: ...

    def batches(self, keys: Iterable[int]) -> Iterator[Batch]: ...

    def stream(self, stream: int) -> StreamedSource: ...
