"""``InMemorySource``: a small replayable source over tensors, for tests, examples and benchmarks.

Keys are the data layer's global steps (``key(epoch, i) = epoch * L + i + 1``, see
:mod:`spacedkd_fast.data.keyed`). The epoch permutation comes from a generator seeded with
``(seed, epoch)``; with ``noise > 0`` each batch gets Gaussian noise from a generator seeded with
``(seed, key)`` (a stand-in for keyed augmentation), so ``batch(key)`` regenerates the identical
tensors. Stream 0 keeps the seeds this source has always used (the engine's bitwise tests rely on
them); ``stream(s)`` for ``s >= 1`` is the same data with its own permutations and noise, drawn
from :func:`~spacedkd_fast.data.keyed.keyed_seed` with the stream's tags.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor

from .keyed import (
    STREAM_NOISE,
    STREAM_PERMUTATION,
    InvalidKeyError,
    check_stream,
    keyed_seed,
    step_key,
    step_locate,
    stream_tag,
)

Batch = tuple[Tensor, Tensor]


class InMemorySource:
    """A replayable source over ``x: [N, ...]``, ``y: [N]``.

    The last partial batch is kept (``L = ceil(N / B)``). ``shuffle=False``: every epoch in data
    order (on every stream). Implements the data layer's replayable-source protocol:
    ``steps_per_epoch``, ``epoch(e, start=0)``, ``batch(key)``, ``key(e, i)``, ``locate(key)``,
    ``keys(e)``, ``stream(s)`` and ``stream_id``.
    """

    stream_id: int = 0

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, seed: int = 0,
                 noise: float = 0.0, shuffle: bool = True) -> None:
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"x and y need the same non-zero length, got {x.shape[0]} and "
                             f"{y.shape[0]}")
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.seed, self.noise, self.shuffle = int(seed), float(noise), shuffle
        self.num_samples = int(x.shape[0])
        self.steps_per_epoch = -(-self.num_samples // self.batch_size)
        self._perms: dict[int, Tensor] = {}  # the last few epochs' permutations

    # ------------------------------------------------------------------------------- keys
    def key(self, epoch: int, i: int) -> int:
        """The key of batch ``i`` of ``epoch``."""
        return step_key(epoch, i, self.steps_per_epoch)

    def locate(self, key: int) -> tuple[int, int]:
        """``key -> (epoch, i)``; :class:`~spacedkd_fast.data.keyed.InvalidKeyError` (a
        ``KeyError`` and a ``ValueError``) for a key that is not an int >= 1."""
        return step_locate(key, self.steps_per_epoch)

    def keys(self, epoch: int, start: int = 0) -> range:
        """The keys of ``epoch`` from batch ``start`` on, in training order."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"start must be in [0, {self.steps_per_epoch}] (batches per epoch), "
                             f"got {start}")
        return range(self.key(epoch, start), self.key(epoch + 1, 0))

    # ----------------------------------------------------------------------------- streams
    def stream(self, stream: int) -> InMemorySource:
        """The same data as stream ``stream``: independent permutations and noise, same keys.

        ``stream(0)`` is the training stream (this source's own draws); views share the tensors.
        """
        stream = check_stream(stream)
        if stream == self.stream_id:
            return self
        view = copy.copy(self)
        view.stream_id = stream
        view._perms = {}
        return view

    def _perm_generator(self, epoch: int) -> torch.Generator:
        if self.stream_id == 0:
            return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        tag = stream_tag(STREAM_PERMUTATION, self.stream_id)
        return torch.Generator().manual_seed(keyed_seed(self.seed, tag, epoch))

    def _noise_generator(self, key: int) -> torch.Generator:
        if self.stream_id == 0:
            return torch.Generator().manual_seed(self.seed * 7_919 + key * 104_729 + 1)
        tag = stream_tag(STREAM_NOISE, self.stream_id)
        return torch.Generator().manual_seed(keyed_seed(self.seed, tag, key))

    # ----------------------------------------------------------------------------- batches
    def _perm(self, epoch: int) -> Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            if self.shuffle:
                perm = torch.randperm(self.num_samples, generator=self._perm_generator(epoch))
            else:
                perm = torch.arange(self.num_samples)
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def _make(self, key: int, perm: Tensor) -> Batch:
        _, i = self.locate(key)
        idx = perm[i * self.batch_size:(i + 1) * self.batch_size].to(self.x.device)
        x, y = self.x[idx], self.y[idx]
        if self.noise > 0:
            g = self._noise_generator(key)
            x = x + self.noise * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        return x, y

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield ``(key, (x, y))`` for batches ``start .. L-1`` of ``epoch`` (``start > 0``:
        a mid-epoch resume; the batches are those an uninterrupted epoch yields)."""
        keys = self.keys(epoch, start)
        perm = self._perm(epoch)
        for key in keys:
            yield key, self._make(key, perm)

    def batch(self, key: int) -> Batch:
        """The batch ``key`` again, bit-identical on the same device."""
        epoch, _ = self.locate(key)
        return self._make(int(key), self._perm(epoch))

    def batches(self, keys) -> Iterator[Batch]:
        """The batches of ``keys`` in order, each equal to ``batch(key)`` (a replay's run)."""
        for key in keys:
            yield self.batch(key)

    def epochs(self, count: int) -> Iterator[tuple[int, Batch]]:
        """``(key, batch)`` for epochs ``0 .. count-1`` in order."""
        for e in range(count):
            yield from self.epoch(e)


__all__ = ["InMemorySource", "InvalidKeyError"]
