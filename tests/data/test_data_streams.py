"""Data streams and mid-epoch resume of the torch sources (TensorSource, FileSource).

Stream 0 must draw exactly what it drew before streams existed (the documented tags, re-derived
here with a naive SplitMix64); stream 1 is the same data with independent permutations and
augmentation, replayable from a fresh source.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_fakes import save_jpeg

from spacedkd_fast.data import Augmenter
from spacedkd_fast.data.datasets import ArrayData, scan_image_folder
from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.data.protocol import StreamedSource
from spacedkd_fast.data.sources import FileSource, TensorSource

M64 = (1 << 64) - 1
PERM, AUGE = 0x5045524D, 0x41554745


def splitmix(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def naive_seed(seed, tag, counter):
    return splitmix(splitmix(splitmix(seed) ^ tag) ^ counter) & ((1 << 63) - 1)


def arrays(n=30, size=12):
    rng = np.random.default_rng(1)
    return ArrayData(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                     np.arange(n, dtype=np.int64), [str(i) for i in range(n)], "fake")


def tensor_source(recipe="vit", seed=4):
    return TensorSource(arrays(), Augmenter(recipe, 12, seed=seed), batch_size=8, seed=seed)


@pytest.mark.parametrize("stream", [0, 1, 3])
def test_permutation_and_draws_use_the_documented_stream_tags(stream):
    src = tensor_source().stream(stream)
    assert src.stream_id == stream
    L = src.steps_per_epoch
    for key in (1, L + 2):
        epoch, i = src.locate(key)
        g = torch.Generator().manual_seed(naive_seed(4, PERM + (stream << 32), epoch))
        want_idx = torch.randperm(30, generator=g)[i * 8:(i + 1) * 8]
        idx, p = src.params(key)
        assert torch.equal(idx, want_idx)
        g = torch.Generator().manual_seed(naive_seed(4, AUGE + (stream << 32), key))
        assert torch.equal(p["rrc"], torch.rand(len(idx), 10, 4, generator=g))
        assert p["stream"] == stream and p["key"] == key


def test_second_stream_is_independent_replayable_and_resumable():
    src = tensor_source()
    s1 = src.stream(1)
    assert isinstance(src, StreamedSource) and isinstance(s1, StreamedSource)
    assert src.stream(0) is src and s1.stream(0).stream_id == 0 and s1.images is src.images
    assert (s1.steps_per_epoch, s1.key(2, 1)) == (src.steps_per_epoch, src.key(2, 1))
    seen = list(s1.epoch(1))
    ids = torch.cat([y for _, (_, y) in seen])
    assert sorted(ids.tolist()) == list(range(30))
    assert not torch.equal(ids, torch.cat([y for _, (_, y) in src.epoch(1)]))
    # the same key on the two streams: other samples and other augmentation
    assert not torch.equal(src.params(5)[1]["rrc"], s1.params(5)[1]["rrc"])
    fresh = tensor_source().stream(1)
    for key, (x, y) in reversed(seen):
        x2, y2 = fresh.batch(key)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    rest = list(tensor_source().stream(1).epoch(1, start=2))
    assert [k for k, _ in rest] == [k for k, _ in seen[2:]]
    assert all(torch.equal(a[0], b[0]) for (_, a), (_, b) in zip(rest, seen[2:]))


def test_erasing_noise_is_keyed_per_stream():
    """Erase every sample: with the same samples in the same order (no shuffle needed: batch
    of the whole set, sorted by label), stream 1's noise must differ from stream 0's."""
    from dataclasses import replace

    from spacedkd_fast.data.augment import get_recipe

    rec = replace(get_recipe("vit"), erasing_p=1.0, random_resized_crop=False, policy=None,
                  flip=False)
    aug = Augmenter(rec, 12, seed=2)
    src = TensorSource(arrays(), aug, batch_size=30, seed=2)
    x0, y0 = src.batch(1)
    x1, y1 = src.stream(1).batch(1)
    x0, x1 = x0[y0.argsort()], x1[y1.argsort()]
    assert not torch.equal(x0, x1)


def test_mid_epoch_resume_matches_the_uninterrupted_epoch():
    src = tensor_source("cifar")
    full = list(src.epoch(3))
    L = src.steps_per_epoch
    for start in (1, L - 1, L):
        rest = list(tensor_source("cifar").epoch(3, start=start))
        assert [k for k, _ in rest] == [k for k, _ in full[start:]]
        assert all(torch.equal(a[0], b[0]) for (_, a), (_, b) in zip(rest, full[start:]))
    for bad in (-1, L + 1):
        with pytest.raises(ValueError, match="start must be in"):
            list(src.epoch(0, start=bad))
    with pytest.raises(ValueError, match="data stream is an int >= 0"):
        src.stream(-1)


def test_file_source_second_stream(tmp_path):
    for k in range(9):
        save_jpeg(tmp_path / "train" / f"c{k % 3}" / f"{k}.JPEG", size=(20 + k, 30), seed=k)
    files = scan_image_folder(tmp_path, "train")

    def make():
        return FileSource(files, Augmenter("imagenet", 16, seed=1), batch_size=4, seed=1,
                          workers=1, prefetch=0)

    src = make()
    s1 = src.stream(1)
    assert s1.stream_id == 1 and isinstance(s1, StreamedSource)
    seen = dict(s1.epoch(0, start=1))
    assert sorted(seen) == [2, 3]
    fresh = make().stream(1)
    for key, (x, y) in seen.items():
        x2, y2 = fresh.batch(key)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    ids0 = torch.cat([y for _, (_, y) in src.epoch(0)])
    ids1 = torch.cat([y for _, (_, y) in s1.epoch(0)])
    assert sorted(ids0.tolist()) == sorted(ids1.tolist())
    assert not torch.equal(src.params(2)[1]["rrc"], s1.params(2)[1]["rrc"])


def test_in_memory_source_follows_the_protocol():
    src = InMemorySource(torch.zeros(5, 2), torch.arange(5), 2)
    assert isinstance(src, StreamedSource) and isinstance(src.stream(1), StreamedSource)
