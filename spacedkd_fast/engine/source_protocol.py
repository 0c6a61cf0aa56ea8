"""The replayable batch-source protocol shared by the engine and the data pipeline.

A *key* names one training batch. Sources in this package use the global step number
``n >= 1`` as the key (``n = epoch * steps_per_epoch + i + 1`` for the i-th batch of an epoch):
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
    - ``epoch(e)``: yields ``(key, (x, y))`` for epoch ``e`` (0-based), in training order.
    - ``batch(key)``: the identical ``(x, y)`` for a key that ``epoch`` yielded (same samples,
      same augmented views, same order within the batch). Bit-identical on the same device.
    """

    steps_per_epoch: int

    def epoch(self, epoch: int) -> Iterator[tuple[int, Batch]]: ...

    def batch(self, key: int) -> Batch: ...
