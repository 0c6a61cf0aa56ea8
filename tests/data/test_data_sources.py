"""Replayable sources (torch backends) and build_data: replay is bit-identical, keys index
epochs as the protocol says, distributed shares partition the global batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_fakes import save_jpeg, write_cifar100

from spacedkd_fast.data import RECIPES, Augmenter, build_data
from spacedkd_fast.data.datasets import ArrayData, UnreadableImageError, scan_image_folder
from spacedkd_fast.data.sources import FileSource, KeyedIndexer, TensorSource
from spacedkd_fast.engine.source_protocol import ReplayableSource


def tiny_arrays(n=50, size=16, seed=0) -> ArrayData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArrayData(images, np.arange(n, dtype=np.int64) % 7, [str(i) for i in range(7)], "fake")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    sizes = [(40, 30), (24, 48), (33, 33), (64, 20), (50, 50), (20, 36)]
    for k in range(12):
        save_jpeg(root / "train" / f"class{k % 3}" / f"{k}.JPEG", size=sizes[k % 6], seed=k)
    for k in range(4):
        save_jpeg(root / "val" / f"class{k % 3}" / f"{k}.JPEG", size=sizes[k], seed=50 + k)
    return root


# ---------------------------------------------------------------------------------- indexing
def test_keys_index_epochs_and_keep_the_partial_batch():
    ix = KeyedIndexer(10, 4, seed=3)
    assert ix.steps_per_epoch == 3
    assert ix.locate(1) == (0, 0) and ix.locate(3) == (0, 2) and ix.locate(4) == (1, 0)
    epoch0 = torch.cat([ix.global_indices(k) for k in (1, 2, 3)])
    assert sorted(epoch0.tolist()) == list(range(10))
    assert len(ix.global_indices(3)) == 2
    assert KeyedIndexer(10, 4, drop_last=True).steps_per_epoch == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n >= 1"):
            ix.locate(bad)


def test_indexer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="rank"):
        KeyedIndexer(10, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="smaller than world_size"):
        KeyedIndexer(10, 2, world_size=4)
    with pytest.raises(ValueError, match="no batch"):
        KeyedIndexer(3, 4, drop_last=True)


# --------------------------------------------------------------------------------- replay
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_tensor_source_replays_each_recipe_bit_identically(recipe):
    data = tiny_arrays()
    src = TensorSource(data, Augmenter(recipe, 16, seed=5), batch_size=16, seed=2)
    assert isinstance(src, ReplayableSource)
    streamed = dict(src.epoch(1))
    assert sorted(streamed) == list(src.keys(1)) == [5, 6, 7, 8]
    for key in (8, 5, 6):  # out of order, after the epoch was streamed
        x, y = src.batch(key)
        assert torch.equal(x, streamed[key][0]) and torch.equal(y, streamed[key][1])
    x5, x6 = streamed[5][0], streamed[6][0]
    assert x5.shape == (16, 3, 16, 16) and x5.dtype == torch.float32
    assert not torch.equal(x5, x6)


def test_same_samples_get_different_views_in_different_steps():
    data = tiny_arrays(n=16)
    src = TensorSource(data, Augmenter("cifar", 16, seed=0), batch_size=16, seed=0)
    (x1, y1), (x2, y2) = src.batch(1), src.batch(2)  # epochs 0 and 1, same 16 samples
    order1, order2 = y1.argsort(stable=True), y2.argsort(stable=True)
    assert not torch.equal(x1[order1], x2[order2])


def test_tensor_source_labels_follow_the_permutation():
    data = tiny_arrays()
    src = TensorSource(data, Augmenter("none", 16), batch_size=8, seed=9)
    idx, _ = src.params(3)
    x, y = src.batch(3)
    assert torch.equal(y, torch.from_numpy(data.labels)[idx])
    ref = (torch.from_numpy(data.images[idx.numpy()]).permute(0, 3, 1, 2).float() / 255
           - torch.tensor(src.augmenter.mean).view(1, 3, 1, 1)) / torch.tensor(src.augmenter.std).view(1, 3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-6)


def test_distributed_ranks_partition_the_global_batch():
    data = tiny_arrays()
    aug = Augmenter("cifar-selfkd", 16, seed=4)
    whole = TensorSource(data, aug, batch_size=12, seed=1)
    parts = [TensorSource(data, aug, batch_size=12, seed=1, rank=r, world_size=3) for r in range(3)]
    for key in (1, 5):  # a full and the partial last batch (50 = 4 * 12 + 2)
        xg, yg = whole.batch(key)
        for r, src in enumerate(parts):
            x, y = src.batch(key)
            assert torch.equal(x, xg[r::3]) and torch.equal(y, yg[r::3])


def test_prefetch_error_reaches_the_consumer():
    data = tiny_arrays()
    src = TensorSource(data, Augmenter("cifar", 16), batch_size=16, prefetch=1)
    src.augmenter = None  # every batch now fails inside the worker thread
    with pytest.raises((AttributeError, TypeError)):
        list(src.epoch(0))


# ---------------------------------------------------------------------------- file source
@pytest.mark.parametrize("recipe", ["imagenet", "tiny", "vit"])
def test_file_source_replays_and_matches_batched_ops(folder, recipe):
    files = scan_image_folder(folder, "train")
    aug = Augmenter(recipe, 24, seed=3)
    src = FileSource(files, aug, batch_size=5, seed=1, workers=2)
    streamed = dict(src.epoch(0))
    assert sorted(streamed) == [1, 2, 3]
    x, y = src.batch(2)
    assert torch.equal(x, streamed[2][0]) and torch.equal(y, streamed[2][1])
    assert x.shape == (5, 3, 24, 24)
    assert not torch.equal(streamed[1][0][:2], streamed[2][0][:2])


def test_file_source_eval_is_resize_then_centre_crop(folder):
    files = scan_image_folder(folder, "val")
    aug = Augmenter("imagenet", 16)
    src = FileSource(files, aug, batch_size=4, workers=1)
    (x, y), = list(src.eval_batches(4))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == files.labels.tolist()


def test_file_source_unreadable_file_is_an_error_naming_it(tmp_path):
    save_jpeg(tmp_path / "train" / "a" / "0.JPEG")
    (tmp_path / "train" / "a" / "1.JPEG").write_bytes(b"not a jpeg")
    src = FileSource(scan_image_folder(tmp_path, "train"), Augmenter("imagenet", 8), batch_size=2, workers=1)
    with pytest.raises(UnreadableImageError, match="1.JPEG"):
        src.batch(1)


# ------------------------------------------------------------------------------ build_data
def test_build_data_defaults_to_digits_and_announces_it(tmp_path):
    b = build_data(None, data_dir=str(tmp_path), batch_size=256)
    assert b.name == "digits" and b.num_classes == 10 and b.image_size == 32
    assert "CIFAR-100 not found" in b.announcement and "digits" in b.announcement
    assert b.backend == "torch-cpu" and "torch-cpu" in b.announcement
    assert b.train.steps_per_epoch == 6 and b.train.num_samples == 1438
    key, (x, y) = next(iter(b.train.epoch(0)))
    assert key == 1 and x.shape == (256, 3, 32, 32) and int(y.max()) < 10
    test_batches = list(b.test())
    assert sum(len(t[1]) for t in test_batches) == 359
    xt = torch.cat([t[0] for t in test_batches])
    assert abs(float(xt.mean())) < 0.1 and abs(float(xt.std()) - 1) < 0.1  # digits' own stats


def test_build_data_prefers_cifar100_on_disk(tmp_path):
    write_cifar100(tmp_path, n_train=40, n_test=8)
    b = build_data(None, data_dir=str(tmp_path), batch_size=16, recipe="cifar-selfkd")
    assert b.name == "cifar100" and b.num_classes == 100 and b.recipe == "cifar-selfkd"
    assert b.train.augmenter.mean == (0.4914, 0.4822, 0.4465)  # self-KD recipe: CIFAR-10 stats
    assert "not found" not in b.announcement
    x, y = b.train.batch(3)
    assert x.shape == (8, 3, 32, 32)  # 40 = 2 * 16 + 8


def test_build_data_vit_resizes_to_224_by_default(tmp_path):
    b = build_data("digits", recipe="vit", batch_size=4, image_size=48)
    assert b.image_size == 48
    x, _ = b.train.batch(1)
    assert x.shape == (4, 3, 48, 48)
    xt, _ = next(iter(b.test()))
    assert xt.shape == (4, 3, 48, 48)
    assert build_data("digits", recipe="vit", batch_size=4).image_size == 224


def test_build_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        build_data("cifar100", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200"):
        build_data("tiny-imagenet", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="imagenet/train"):
        build_data("imagenet", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown data set"):
        build_data("mnist")
    with pytest.raises(ValueError, match="unknown augmentation recipe"):
        build_data("digits", recipe="fancy")
    with pytest.raises(ValueError, match="unknown data backend"):
        build_data("digits", backend="tpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_data("digits", backend="gpu")


def test_build_data_folder_dataset(folder):
    b = build_data(f"folder:{folder}", batch_size=4, image_size=24, backend="cpu")
    assert b.name == "folder" and b.num_classes == 3 and b.backend == "torch-cpu"
    x, y = b.train.batch(2)
    assert x.shape == (4, 3, 24, 24)
    assert sum(len(t[1]) for t in b.test()) == 4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_gpu_resident_matches_cpu_path(recipe):
    data = tiny_arrays()
    cpu = TensorSource(data, Augmenter(recipe, 16, seed=5), batch_size=16, seed=2)
    gpu = TensorSource(data, Augmenter(recipe, 16, seed=5), batch_size=16, seed=2, device="cuda")
    assert gpu.backend == "gpu-resident"
    streamed = dict(gpu.epoch(0))
    for key in (1, 4):
        xg, yg = gpu.batch(key)
        assert xg.is_cuda and torch.equal(xg, gpu.batch(key)[0])  # replay on the device
        if key in streamed:
            assert torch.equal(xg, streamed[key][0])
        xc, yc = cpu.batch(key)
        assert torch.equal(yg.cpu(), yc)
        ug, _ = gpu.uint8_batch(key)
        uc, _ = cpu.uint8_batch(key)
        d = (ug.cpu().int() - uc.int()).abs()
        if RECIPES[recipe].random_resized_crop:  # bilinear: float rounding may differ by 1
            assert d.max() <= 1 and (d > 0).float().mean() < 0.01
        else:
            assert torch.equal(ug.cpu(), uc)  # crop / flip / nearest rotation: the same pixels
        close = (xg.cpu() - xc).abs() <= 1e-5
        if recipe in ("cifar", "tiny", "none"):
            assert close.all(), recipe
        elif recipe != "vit":  # vit: the erasing noise comes from the device's own generator
            # Photometric float math may round a value on a .5 boundary the other way.
            assert close.float().mean() > 0.99, recipe


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_augmentation_delivers_to_cuda_through_the_copy_stream():
    auto = build_data("digits", device="cuda", batch_size=64)
    assert auto.backend == "gpu-resident" and "gpu-resident" in auto.announcement
    b = build_data("digits", device="cuda", backend="cpu", batch_size=64)
    ref = build_data("digits", device="cpu", batch_size=64)
    assert b.backend == "torch-cpu"
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # the consumer may train on a stream of its own
        streamed = dict(b.train.epoch(0))
        for key in (1, 7, 23):
            x, y = streamed[key]
            assert x.is_cuda and y.is_cuda
            x = x * 1.0  # queued on the side stream after the wait for the copy
            assert torch.equal(x.cpu(), ref.train.batch(key)[0])
            assert torch.equal(b.train.batch(key)[0].cpu(), ref.train.batch(key)[0])
    xt, _ = next(iter(b.test()))
    assert xt.is_cuda
