"""InMemorySource: the key scheme, mid-epoch resume and the second stream, checked against
naive re-derivations (permutations and noise rebuilt from the documented seeds)."""

from __future__ import annotations

import pytest
import torch

from spacedkd_fast.data.keyed import InvalidKeyError
from spacedkd_fast.data.memory import InMemorySource


def _data(n=50):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 3, generator=g), torch.arange(n)


def test_stream0_draws_the_documented_seeds():
    """Stream 0's permutation seed is ``seed * 1_000_003 + epoch`` and its noise seed
    ``seed * 7_919 + key * 104_729 + 1``: the engine's bitwise tests were written against them."""
    x, y = _data()
    src = InMemorySource(x, y, 8, seed=3, noise=0.2)
    L = 7
    assert src.steps_per_epoch == L
    for key, (xb, yb) in src.epochs(2):
        epoch, i = divmod(key - 1, L)
        perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003 + epoch))
        idx = perm[i * 8:(i + 1) * 8]
        g = torch.Generator().manual_seed(3 * 7_919 + key * 104_729 + 1)
        want = x[idx] + 0.2 * torch.randn(x[idx].shape, generator=g)
        assert torch.equal(yb, y[idx]) and torch.equal(xb, want)


def test_keys_locate_and_mid_epoch_resume():
    x, y = _data()
    src = InMemorySource(x, y, 8, seed=1, noise=0.1)
    L = src.steps_per_epoch
    assert [src.key(e, i) for e, i in ((0, 0), (0, 6), (1, 0), (2, 3))] == [1, 7, 8, 18]
    assert all(src.locate(src.key(e, i)) == (e, i) for e in range(3) for i in range(L))
    full = list(src.epoch(2))
    for start in (0, 1, 4, L - 1, L):
        rest = list(InMemorySource(x, y, 8, seed=1, noise=0.1).epoch(2, start=start))
        assert [k for k, _ in rest] == [k for k, _ in full[start:]]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for (_, a), (_, b) in zip(rest, full[start:]))
    assert list(src.keys(1, 3)) == list(range(src.key(1, 3), src.key(2, 0)))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_bad_keys_are_key_and_value_errors(bad):
    src = InMemorySource(*_data(), 8)
    with pytest.raises(KeyError, match="n >= 1"):
        src.batch(bad)
    with pytest.raises(ValueError, match="n >= 1"):
        src.locate(bad)
    assert issubclass(InvalidKeyError, KeyError) and issubclass(InvalidKeyError, ValueError)


def test_bad_epoch_start_and_stream_are_clear_errors():
    src = InMemorySource(*_data(), 8)
    with pytest.raises(ValueError, match="start must be in"):
        next(src.epoch(0, start=8))
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        next(src.epoch(-1))
    for bad in (-1, 1.0, "1", None):
        with pytest.raises(ValueError, match="data stream is an int >= 0"):
            src.stream(bad)


def test_second_stream_is_independent_and_replays():
    x, y = _data()
    src = InMemorySource(x, y, 8, seed=5, noise=0.3)
    s1 = src.stream(1)
    assert src.stream(0) is src and s1.stream(1) is s1 and s1.stream(0).stream_id == 0
    assert (s1.stream_id, s1.steps_per_epoch, s1.key(1, 2)) == (1, src.steps_per_epoch, src.key(1, 2))
    seen = list(s1.epochs(2))
    # every sample once per epoch, in an order other than stream 0's, with different noise
    for e in range(2):
        ids = torch.cat([b[1] for k, b in seen if s1.locate(k)[0] == e])
        assert sorted(ids.tolist()) == list(range(50))
        ids0 = torch.cat([b[1] for _, b in src.epoch(e)])
        assert not torch.equal(ids, ids0)
    # the same sample gets other noise on stream 1 than on stream 0 (the noise is keyed per stream)
    x0 = {int(v): r for k, (xb, yb) in src.epochs(1) for v, r in zip(yb, xb)}
    x1 = {int(v): r for k, (xb, yb) in s1.epochs(1) for v, r in zip(yb, xb)}
    assert all(not torch.equal(x0[i], x1[i]) for i in range(50))
    # replay: a fresh view gives the identical batches in any order; streams 1 and 2 differ
    fresh = InMemorySource(x, y, 8, seed=5, noise=0.3).stream(1)
    for key, (xb, yb) in reversed(seen):
        xr, yr = fresh.batch(key)
        assert torch.equal(xb, xr) and torch.equal(yb, yr)
    ids2 = torch.cat([b[1] for _, b in src.stream(2).epoch(0)])
    assert not torch.equal(ids2, torch.cat([b[1] for k, b in seen[:src.steps_per_epoch]]))
    # a resumed stream-1 epoch continues with the same batches
    rest = list(InMemorySource(x, y, 8, seed=5, noise=0.3).stream(1).epoch(1, start=3))
    tail = seen[src.steps_per_epoch + 3:]
    assert [k for k, _ in rest] == [k for k, _ in tail]
    assert all(torch.equal(a[0], b[0]) for (_, a), (_, b) in zip(rest, tail))


def test_unshuffled_streams_share_the_order_but_not_the_noise():
    x, y = _data(20)
    src = InMemorySource(x, y, 6, noise=0.1, shuffle=False)
    a, b = src.batch(2), src.stream(1).batch(2)
    assert torch.equal(a[1], torch.arange(6, 12)) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], b[0])
