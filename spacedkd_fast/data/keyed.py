"""Counter-based randomness: generators keyed by ``(seed, stream, counter)``.

A generator is made afresh from a 64-bit hash (SplitMix64 finaliser) of the seed, a stream tag
and the counter (a global step or an epoch), so a draw depends only on those numbers and never
on call order: ``batch(key)`` can be asked at any time and draws the same parameters.
The draws use a CPU ``torch.Generator``, so parameters are identical whatever device later
applies them.
"""

from __future__ import annotations

from functools import lru_cache

import torch

_MASK64 = (1 << 64) - 1

# Stream tags keep the epoch permutation and the augmentation draws independent.
STREAM_PERMUTATION = 0x5045524D  # "PERM"
STREAM_AUGMENT = 0x41554745  # "AUGE"
STREAM_NOISE = 0x4E4F4953  # "NOIS"


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


def keyed_generator(seed: int, stream: int, counter: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with :func:`keyed_seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(keyed_seed(seed, stream, counter))
    return g


@lru_cache(maxsize=4)
def _cached_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=keyed_generator(seed, STREAM_PERMUTATION, epoch))


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order of ``epoch``: an int64 permutation of ``range(n)`` on the CPU.

    A few recent epochs are cached, since a replay reaches back at most a few epochs.
    """
    if n <= 0:
        raise ValueError(f"cannot permute an empty data set (n = {n})")
    return _cached_permutation(int(seed), int(epoch), int(n))
