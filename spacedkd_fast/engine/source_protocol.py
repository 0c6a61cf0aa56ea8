"""The replayable batch-source protocol shared by the engine and the data pipeline.

A *key* names one training batch. Sources in this package use the global step number
``n >= 1`` as the key (the data layer computes it; the engine never does):
from it and the source's seed, the epoch permutation and a counter-based augmentation generator
give back the sample indices and every augmentation parameter, so ``batch(key)`` regenerates the
identical tensors without storing pixels. Keys are plain ``int`` so that they fit in a JSON trace
and a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from torch import Tensor

Batch = tuple[Tensor, Tensor]


@runtime_checkable
class ReplayableSource(Protocol):
    """A source of training batches that can give back any batch it produced.

    - ``steps_per_epoch``: ``L``, batches per epoch (the last partial batch included).
    - ``epoch(e, start=0)``: yields ``(key, (x, y))`` for batches ``start ..`` of epoch ``e``
      (0-based), in training order (``start > 0``: a mid-epoch resume).
    - ``batch(key)``: the identical ``(x, y)`` for a key that ``epoch`` yielded (same samples,
      same augmented views, same order within the batch). Bit-identical on the same device.

    Optional: ``batches(keys)``, the batches of ``keys`` in order (each equal to ``batch(key)``),
    loaded ahead; a replay asks for its whole run at once and streams it at loader speed. A
    source without it (or a wrapper that forwards attributes to an inner source, whose own class
    does not define it) is asked ``batch(key)`` one at a time. Every source of
    ``spacedkd_fast.data`` has it.
    """

    steps_per_epoch: int

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]: ...

    def batch(self, key: int) -> Batch: ...


@runtime_checkable
class StreamedSource(ReplayableSource, Protocol):
    """A replayable source with more than one data stream (``replay="fresh"`` needs one).

    - ``stream(s)``: the same data as stream ``s`` (``0``: the training stream itself, ``1``: a
      second, independently shuffled and augmented one), itself a :class:`ReplayableSource` whose
      epochs and keys follow the same rules; its draws depend only on ``(seed, s, epoch / key)``,
      so a resumed run gets the same batches.
    """

    def stream(self, stream: int) -> ReplayableSource: ...
