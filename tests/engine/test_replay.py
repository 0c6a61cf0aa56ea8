"""replay.py: keyed replay regenerates identical batches; CopyReplay copies; byte accounting."""

import pytest
import torch

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.replay import KEY_BYTES, CopyReplay, KeyedReplay
from spacedkd_fast.engine.source_protocol import ReplayableSource
from spacedkd_fast.engine.trace import batch_checksum


def _source(noise=0.1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, 4, generator=g)
    y = torch.randint(0, 5, (50,), generator=g)
    return InMemorySource(x, y, batch_size=8, seed=3, noise=noise)


def test_tensor_source_is_replayable_and_regenerates_bitwise():
    src = _source()
    assert isinstance(src, ReplayableSource)
    assert src.steps_per_epoch == 7  # ceil(50 / 8): the last partial batch is kept
    seen = list(src.epochs(2))
    assert [k for k, _ in seen] == list(range(1, 15))
    assert seen[6][1][0].shape[0] == 2  # the last batch of an epoch has 50 - 48 samples
    for key, (x, y) in reversed(seen):  # any order of requests
        x2, y2 = src.batch(key)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # epochs are permuted differently and every sample appears once per epoch
    ids0 = torch.cat([b[1] for _, b in seen[:7]])
    ids1 = torch.cat([b[1] for _, b in seen[7:]])
    assert sorted(ids0.tolist()) == sorted(src.y.tolist()) == sorted(ids1.tolist())
    assert not torch.equal(seen[0][1][0], seen[7][1][0])
    with pytest.raises(KeyError):
        src.batch(0)


def test_keyed_replay_holds_key_and_checksum_only():
    src = _source()
    buf = KeyedReplay(src)
    for key, (x, y) in src.epoch(0):
        buf.record(key, x, y, batch_checksum(x, y))
    assert len(buf) == 7 and buf.samples_held == 50
    assert buf.bytes_held() == 7 * (KEY_BYTES + 4 * 8)
    assert buf.bytes_per_sample() == pytest.approx(7 * 40 / 50)
    rec = buf.take(1)[0]
    x, y = buf.fetch(rec)
    assert torch.equal(batch_checksum(x, y), rec.checksum)
    assert len(buf) == 6
    with pytest.raises(TypeError, match="ReplayableSource"):
        KeyedReplay(object())


def test_copy_replay_keeps_independent_copies_and_counts_bytes():
    buf = CopyReplay()
    x = torch.randn(8, 3, 4, 4)
    y = torch.arange(8)
    buf.record("a", x, y, batch_checksum(x, y))
    x.add_(100.0)  # the caller reuses its buffer: the record must not change
    rec = buf.take()[0]
    xs, ys = buf.fetch(rec)
    assert torch.equal(batch_checksum(xs, ys), rec.checksum)
    assert xs.data_ptr() != x.data_ptr()

    half = CopyReplay(device="cpu", dtype=torch.float16)
    x = torch.randn(8, 3, 4, 4)
    half.record(1, x, y, batch_checksum(x, y))
    assert half.pending[0].batch[0].dtype == torch.float16
    assert half.pending[0].batch[1].dtype == torch.int64  # labels stored as given
    expected = KEY_BYTES + 32 + x.numel() * 2 + y.numel() * 8
    assert half.bytes_held() == expected
    assert half.bytes_per_sample() == pytest.approx(expected / 8)


def test_replay_state_round_trip():
    src = _source()
    keyed, copies = KeyedReplay(src), CopyReplay()
    for key, (x, y) in list(src.epoch(0))[:3]:
        keyed.record(key, x, y, batch_checksum(x, y))
        copies.record(key, x, y, batch_checksum(x, y))
    k2, c2 = KeyedReplay(src), CopyReplay()
    k2.load_state_dict(keyed.state_dict())
    c2.load_state_dict(copies.state_dict())
    assert [r.key for r in k2.pending] == [1, 2, 3]
    for a, b in zip(copies.pending, c2.pending):
        assert a.key == b.key and torch.equal(a.checksum, b.checksum)
        assert all(torch.equal(s, t) for s, t in zip(a.batch, b.batch))
    assert all(r.batch is None for r in k2.pending)
