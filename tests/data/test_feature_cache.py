"""Precomputed teacher maps (data/feature_cache.py): the per-sample crop and flip against a naive
per-pixel implementation written from the description, a map that is the image itself following
the image's own augmentation, and the cache files (round trip, stale and damaged caches)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spacedkd_fast.data import ArrayData, TensorSource
from spacedkd_fast.data.augment import Augmenter
from spacedkd_fast.data.feature_cache import (
    MANIFEST,
    CacheSpec,
    CacheWriter,
    FeatureCache,
    MapsSource,
    StaleCacheError,
    crop_maps,
)


def naive_crop(m: np.ndarray, top: int, left: int, bh: int, bw: int, flip: bool,
               H: int, W: int) -> np.ndarray:
    """One sample's map ``[C, h, w]`` (float64): the box (image pixels of an H x W image) scaled
    to map coordinates, sampled at ``h x w`` half-pixel centres, bilinear with edge clamping,
    then mirrored."""
    C, h, w = m.shape
    out = np.zeros_like(m)
    box_t, box_h = top * h / H, bh * h / H
    box_l, box_w = left * w / W, bw * w / W
    for i in range(h):
        y = min(max(box_t + (i + 0.5) * box_h / h - 0.5, 0.0), h - 1)
        y0 = math.floor(y)
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(w):
            x = min(max(box_l + (j + 0.5) * box_w / w - 0.5, 0.0), w - 1)
            x0 = math.floor(x)
            x1, fx = min(x0 + 1, w - 1), x - x0
            v = ((1 - fy) * ((1 - fx) * m[:, y0, x0] + fx * m[:, y0, x1])
                 + fy * ((1 - fx) * m[:, y1, x0] + fx * m[:, y1, x1]))
            out[:, i, w - 1 - j if flip else j] = v
    return out


def _boxes(n: int, H: int, W: int, seed: int = 0):
    """Boxes drawn by the vit-official augmenter, then a few edge cases: the whole image, a
    one-pixel box in a corner, a thin strip at the right edge."""
    aug = Augmenter("vit-official", 224, seed=seed)
    p = aug.draw(7, n)
    top, left, h, w, flip = aug.crop_geometry(p, torch.full((n,), H), torch.full((n,), W))
    edge = torch.tensor([[0, 0, H, W], [H - 1, 0, 1, 1], [0, W - 3, H, 3]])
    top, left, h, w = (torch.cat([a, edge[:, k]]) for k, a in enumerate((top, left, h, w)))
    flip = torch.cat([flip, torch.tensor([False, True, True])])
    return top, left, h, w, flip


@pytest.mark.parametrize("H,W,sizes", [(32, 32, [(32, 32), (16, 16), (8, 8)]),
                                       (24, 32, [(6, 8), (3, 4)])])
def test_crop_maps_match_a_naive_per_sample_crop_in_float64(H, W, sizes):
    top, left, h, w, flip = _boxes(9, H, W)
    B = len(top)
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(B, 2, mh, mw, generator=g, dtype=torch.float64) for mh, mw in sizes]
    got = crop_maps(maps, top, left, h, w, flip, (H, W))
    for m, out in zip(maps, got):
        assert out.dtype == torch.float64 and out.shape == m.shape
        for b in range(B):
            want = naive_crop(m[b].numpy(), int(top[b]), int(left[b]), int(h[b]), int(w[b]),
                              bool(flip[b]), H, W)
            np.testing.assert_allclose(out[b].numpy(), want, rtol=0, atol=1e-12,
                                       err_msg=f"sample {b}, map {tuple(m.shape[2:])}")


def test_the_whole_image_unflipped_leaves_maps_unchanged_and_flipped_mirrors_them():
    m = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    full = torch.full((2,), 32)
    zero = torch.zeros(2, dtype=torch.long)
    same, = crop_maps([m], zero, zero, full, full, torch.tensor([False, True]), (32, 32))
    assert torch.equal(same[0], m[0])
    assert torch.equal(same[1], m[1].flip(-1))


def test_a_map_that_is_the_image_follows_the_images_own_crop_and_flip():
    """With bilinear resizing (recipe "vit") and the output at the image's size, the image's
    geometric stage is the same crop/resize/flip: a "map" equal to the image must come out equal
    to the augmented image, up to its rounding to uint8, wherever a sample lies between the box's
    pixel centres (outside them the image clamps to the box, a map to the whole map)."""
    n, S = 12, 16
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
    data = ArrayData(images, np.zeros(n, dtype=np.int64), 10, "random")
    source = TensorSource(data, Augmenter("vit", S, seed=3), batch_size=5, seed=3, prefetch=0)
    spec = _spec(n, (S, S))
    cache = _write(spec, [torch.from_numpy(images).permute(0, 3, 1, 2).double()])
    maps = MapsSource(source, source, cache)
    i = torch.arange(S, dtype=torch.float64)

    def inside(start, extent):  # [B, S]: the sample lies between the box's pixel centres
        pos = start.view(-1, 1) + (i + 0.5) * extent.view(-1, 1) / S - 0.5
        return (pos >= start.view(-1, 1)) & (pos <= (start + extent - 1).view(-1, 1))

    inside_total = total = 0
    for key in (1, 2, 3, 4, 5, 6):
        img, p = source.uint8_batch(key)
        got, = maps.maps_of_key(key)
        assert got.shape == img.shape
        b = img.shape[0]
        top, left, h, w, flip = source.augmenter.crop_geometry(p, torch.full((b,), S),
                                                               torch.full((b,), S))
        rows, cols = inside(top, h), inside(left, w)
        cols = torch.where(flip.view(-1, 1), cols.flip(1), cols)
        mask = (rows.view(-1, 1, S, 1) & cols.view(-1, 1, 1, S)).expand_as(got)
        inside_total, total = inside_total + int(mask.sum()), total + mask.numel()
        err = (got - img.double()).abs()[mask].max().item()
        assert err <= 0.5 + 1e-4, f"key {key}: the map is {err} grey levels from the image"
    assert inside_total > 0.7 * total, inside_total / total  # most of every output is compared


def test_maps_are_given_only_for_the_batch_the_source_yielded_last():
    n = 8
    data = ArrayData(np.zeros((n, 8, 8, 3), np.uint8), np.zeros(n, np.int64), 10, "zeros")
    source = TensorSource(data, Augmenter("vit", 8, seed=0), batch_size=4, seed=0, prefetch=0)
    maps = MapsSource(source, source, _write(_spec(n, (8, 8)), [torch.zeros(n, 1, 4, 4)]))
    with pytest.raises(RuntimeError, match="not the one the source yielded last"):
        maps.maps_for(torch.zeros(4, 3, 8, 8))
    (k1, (x1, _)), (k2, (x2, _)) = list(maps.epoch(0))
    assert maps.maps_for(x2)[0].shape == (4, 1, 4, 4)
    with pytest.raises(RuntimeError):
        maps.maps_for(x1)  # an older batch
    x = maps.batch(k1)[0]
    assert torch.equal(maps.maps_for(x)[0], maps.maps_of_key(k1)[0])
    crop = Augmenter("cifar", 8)
    with pytest.raises(ValueError, match="padded crop and a rotation"):
        MapsSource(source, TensorSource(data, crop, batch_size=4), maps.cache)


# ----------------------------------------------------------------------------- files
def _spec(n: int, image_size=(8, 8), **over) -> CacheSpec:
    values = dict(teacher_checkpoint="t.pt", teacher_sha256="a" * 64, teacher_arch="resnet56",
                  blocks=(0,), teacher_image_size=image_size[0], mean=(0.5,) * 3, std=(0.25,) * 3,
                  dataset="random", num_samples=n, image_size=tuple(image_size),
                  data_sha256="b" * 64)
    values.update(over)
    return CacheSpec(**values)


_FOLDERS = iter(range(10**6))


def _write(spec: CacheSpec, maps, folder=None, dtype="float32") -> FeatureCache:
    import tempfile

    folder = folder or tempfile.mkdtemp(prefix=f"maps{next(_FOLDERS)}-")
    writer = CacheWriter(folder, spec, [tuple(m.shape[1:]) for m in maps], dtype)
    order = torch.randperm(spec.num_samples)  # rows arrive in any order
    for chunk in order.split(3):
        writer.write(chunk, [m[chunk] for m in maps])
    writer.finish()
    return FeatureCache.open(folder)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_round_trip_returns_each_samples_maps(tmp_path, dtype):
    n = 10
    spec = _spec(n, blocks=(0, 2))
    maps = [torch.randn(n, 4, 8, 8), torch.randn(n, 2, 2, 2)]
    cache = _write(spec, maps, tmp_path, dtype)
    assert cache.spec == spec and cache.shapes == [(4, 8, 8), (2, 2, 2)]
    idx = torch.tensor([7, 0, 7, 3])
    for got, m in zip(cache.gather(idx), maps):
        want = m[idx].to(getattr(torch, dtype)).float()
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert cache.verify_files() == []


def test_a_stale_cache_is_refused_with_one_line_naming_what_differs(tmp_path):
    spec = _spec(4)
    cache = _write(spec, [torch.zeros(4, 1, 2, 2)], tmp_path)
    cache.check(spec)
    other = _spec(4, teacher_sha256="c" * 64, blocks=(1,))
    with pytest.raises(StaleCacheError) as err:
        cache.check(other)
    text = str(err.value)
    assert "\n" not in text and "stale" in text and "teacher_sha256: cache aaaaaaaaaaaa, this " \
        "run cccccccccccc" in text and "(and 1 more)" in text
    assert cache.mismatches(_spec(4, teacher_checkpoint="elsewhere/t.pt")) == []  # path only


def test_an_unfinished_or_damaged_cache_is_never_read(tmp_path):
    spec = _spec(4)
    writer = CacheWriter(tmp_path, spec, [(1, 2, 2)])
    writer.write(torch.arange(3), [torch.zeros(3, 1, 2, 2)])
    with pytest.raises(ValueError, match="1 of 4 samples have no maps"):
        writer.finish()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        FeatureCache.open(tmp_path)
    cache = _write(spec, [torch.zeros(4, 1, 2, 2)], tmp_path)
    path = tmp_path / "block0.npy"
    arr = np.load(path, mmap_mode="r+")
    arr[2, 0, 1, 1] = 5.0  # the maps changed after the manifest was written
    arr.flush()
    del arr
    assert cache.verify_files() == ["block0.npy"]
    np.save(path, np.zeros((3, 1, 2, 2), np.float32))  # another shape
    with pytest.raises(StaleCacheError, match="manifest says"):
        FeatureCache.open(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(StaleCacheError, match="unreadable manifest.json"):
        FeatureCache.open(tmp_path)
