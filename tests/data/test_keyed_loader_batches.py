"""``batches(keys)``, the run of batches a replay asks for at once, on every source of
``spacedkd_fast.data``: equal to ``batch(key)`` one at a time, in any order of keys across epochs,
with and without the look-ahead thread; and a wrapper that forwards attributes to its inner
source is asked ``batch(key)`` by the engine (its own transform of a batch is kept)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_fakes import save_jpeg

from spacedkd_fast.data import Augmenter, InMemorySource, KeyedLoader
from spacedkd_fast.data.datasets import ArrayData, scan_image_folder
from spacedkd_fast.data.sources import FileSource, TensorSource
from spacedkd_fast.engine.replay import KeyedReplay, Record


def arrays(n=20, size=12) -> ArrayData:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArrayData(images, np.arange(n, dtype=np.int64) % 4, [str(i) for i in range(4)], "fake")


def files(tmp_path):
    for k in range(9):
        save_jpeg(tmp_path / "train" / f"class{k % 3}" / f"{k}.JPEG", size=(20 + k, 16), seed=k)
    return scan_image_folder(tmp_path, "train")


def sources(tmp_path):
    yield "in-memory", InMemorySource(torch.randn(20, 5), torch.arange(20) % 3, 6, noise=0.1)
    for prefetch in (0, 1):
        yield f"tensor prefetch={prefetch}", TensorSource(
            arrays(), Augmenter("cifar", 12, seed=1), batch_size=6, prefetch=prefetch)
    yield "file", FileSource(files(tmp_path), Augmenter("imagenet", 8, seed=1), batch_size=4,
                             workers=2)
    yield "keyed loader", KeyedLoader(torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20)),
                                      batch_size=6)


def test_batches_equal_batch_for_every_source(tmp_path):
    for name, src in sources(tmp_path):
        L = src.steps_per_epoch
        keys = [src.key(1, L - 1), src.key(0, 0), src.key(2, 1), src.key(1, 0)]
        got = list(src.batches(keys))
        assert len(got) == len(keys), name
        for k, b in zip(keys, got):
            want = src.batch(k)
            assert all(torch.equal(u, v) for u, v in zip(b, want)), (name, k)
        assert list(src.batches([])) == [], name


class Doubling:
    """A wrapper that changes each batch and forwards everything else to its inner source."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batch(self, key):
        x, y = self.inner.batch(key)
        return 2 * x, y


@pytest.mark.parametrize("inner", ["tensor", "keyed loader"])
def test_a_forwarding_wrapper_is_asked_batch_by_batch(inner):
    src = (TensorSource(arrays(), Augmenter("cifar", 12, seed=1), batch_size=6) if inner == "tensor"
           else KeyedLoader(torch.utils.data.TensorDataset(torch.randn(20, 3), torch.arange(20)), batch_size=6))
    wrapped = Doubling(src)
    records = [Record(k, 6, None) for k in (3, 1, 2)]
    got = list(KeyedReplay(wrapped).fetch_run(records))
    for rec, (x, _) in zip(records, got):
        assert torch.equal(x, 2 * src.batch(rec.key)[0])
    direct = list(KeyedReplay(src).fetch_run(records))  # the source's own run
    for rec, (x, _) in zip(records, direct):
        assert torch.equal(x, src.batch(rec.key)[0])
