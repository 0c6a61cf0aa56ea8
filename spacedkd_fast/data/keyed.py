"""Counter-based randomness: generators keyed by ``(seed, stream, counter)``.

A generator is made afresh from a 64-bit hash (SplitMix64 finaliser) of the seed, a stream tag
and the counter (a global step or an epoch), so a draw depends only on those numbers and never
on call order: ``batch(key)`` can be asked at any time and draws the same parameters.
The draws use a CPU ``torch.Generator``, so parameters are identical whatever device later
applies them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

_MASK64 = (1 << 64) - 1

# Stream tags keep the epoch permutation and the augmentation draws independent.
STREAM_PERMUTATION = 0x5045524D  # "PERM"
STREAM_AUGMENT = 0x41554745  # "AUGE"
STREAM_NOISE = 0x4E4F4953  # "NOIS"
STREAM_SAMPLE = 0x53414D50  # "SAMP": the per-sample seeds of a user's Dataset (KeyedLoader)


def stream_tag(base: int, stream: int) -> int:
    """The tag of ``base`` (a ``STREAM_*`` value) for data stream ``stream``.

    Stream 0 keeps the plain tags (so its keys draw what they always drew); stream ``s > 0``
    moves the tag into bits 32 and up, so its permutations and augmentation draws are
    independent of every other stream's.
    """
    stream = check_stream(stream)
    return int(base) + (stream << 32)


def check_stream(stream) -> int:
    """``stream`` as an ``int >= 0``, or a ``ValueError`` that says what a stream is."""
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < (1 << 31):
        raise ValueError(f"a data stream is an int >= 0 (0: the training stream, 1: a second, "
                         f"independently shuffled and augmented pass of the same data), got {stream!r}")
    return stream


def step_key(epoch: int, i: int, steps_per_epoch: int) -> int:
    """The key of batch ``i`` of ``epoch``: the global step ``epoch * L + i + 1`` (keys start at 1).

    The one place the key formula lives; sources expose it as ``key(epoch, i)``.
    """
    return int(epoch) * int(steps_per_epoch) + int(i) + 1


class InvalidKeyError(ValueError, KeyError):
    """A key that no source yields (not an int >= 1). Both a ``ValueError`` and a ``KeyError``,
    so callers written against either keep working."""

    __str__ = ValueError.__str__  # not KeyError's quoted repr


def step_locate(key: int, steps_per_epoch: int) -> tuple[int, int]:
    """``key -> (epoch, i)``, the inverse of :func:`step_key`; :class:`InvalidKeyError` for a
    key that is not an int >= 1."""
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 1:
        raise InvalidKeyError(f"keys are global steps n >= 1, got {key!r}")
    e, i = divmod(int(key) - 1, int(steps_per_epoch))
    return e, i


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def keyed_seed(seed: int, stream: int, counter: int) -> int:
    """A 63-bit seed that depends only on ``(seed, stream, counter)``."""
    h = _splitmix64(int(seed) & _MASK64)
    h = _splitmix64(h ^ (int(stream) & _MASK64))
    h = _splitmix64(h ^ (int(counter) & _MASK64))
    return h & ((1 << 63) - 1)


def sample_seeds(seed: int, stream: int, key: int, position: int) -> tuple[int, int, int]:
    """Seeds for torch's, numpy's and Python's global generators for the sample at ``position``
    of the global batch ``key`` on data stream ``stream`` (what
    :class:`~spacedkd_fast.data.keyed_loader.KeyedLoader` seeds around ``dataset[i]``).

    They depend only on those four numbers (not on the sample index, the worker, the process or
    the rank), so a replay, a resume or another rank draws the same. The three differ, so that
    torch's and numpy's Mersenne twisters (the same algorithm) do not draw the same numbers.
    Returns ``(torch 63-bit, numpy 32-bit, python 63-bit)``.
    """
    return batch_sample_seeds(seed, stream, key, [position])[0]


def batch_sample_seeds(seed: int, stream: int, key: int, positions) -> list[tuple[int, int, int]]:
    """:func:`sample_seeds` of every position in ``positions`` (the batch's hash made once)."""
    base = keyed_seed(seed, stream_tag(STREAM_SAMPLE, stream), key)
    low63 = (1 << 63) - 1
    out = []
    for position in positions:
        h = _splitmix64(base ^ (int(position) & _MASK64))
        out.append((h & low63, _splitmix64(h ^ 1) & 0xFFFFFFFF, _splitmix64(h ^ 2) & low63))
    return out


def keyed_generator(seed: int, stream: int, counter: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`keyed_seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(keyed_seed(seed, stream, counter))
    return g


@lru_cache(maxsize=8)
def _cached_permutation(seed: int, epoch: int, n: int, stream: int) -> torch.Tensor:
    tag = stream_tag(STREAM_PERMUTATION, stream)
    return torch.randperm(n, generator=keyed_generator(seed, tag, epoch))


def epoch_permutation(seed: int, epoch: int, n: int, stream: int = 0) -> torch.Tensor:
    """The sample order of ``epoch`` on data stream ``stream``: an int64 permutation of
    ``range(n)`` on the CPU.

    A few recent epochs are cached (per stream), since a replay reaches back at most a few epochs.
    """
    if n <= 0:
        raise ValueError(f"cannot permute an empty data set (n = {n})")
    return _cached_permutation(int(seed), int(epoch), int(n), check_stream(stream))
