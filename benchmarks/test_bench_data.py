"""Images per second of the data backends per recipe, as ratios against per-sample torchvision
transforms in a ``DataLoader`` (the official code's pipeline), measured in one run.

Each round produces one epoch of ``N`` images in batches of 128 (``N`` = 1,024 at 32 px, 256 at
224 px; halved with ``SPACEDKD_BENCH_QUICK=1``, which also skips the 0-worker loaders and DALI
at 224 px): images per second = ``N / median``. Providers:
``torchvision DataLoader (2 workers)`` (baseline), ``torchvision DataLoader (0 workers)``,
``torch-cpu batched`` (``TensorSource``, with its look-ahead thread), ``DALI CPU mode``
(``DaliSource`` streaming through ``DALIGenericIterator``; not for ``vit-official``, which
resamples as PIL does). CUDA: ``gpu-resident`` on a GPU. The ``vit-official`` baseline is timm's
``create_transform`` with the official arguments, as the official ViT code builds it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset

from spacedkd_fast.data import Augmenter, TensorSource, dali_available
from spacedkd_fast.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from spacedkd_fast.data.datasets import ArrayData, load_digits_split

QUICK = os.environ.get("SPACEDKD_BENCH_QUICK", "0") not in ("", "0")
BATCH = 128


class Cutout:
    """One square hole of ``length`` pixels on a CHW tensor (the self-KD code's per-sample op)."""

    def __init__(self, length: int = 16):
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[1:]
        y, x = np.random.randint(h), np.random.randint(w)
        h0, h1 = max(0, y - self.length // 2), min(h, y + self.length // 2)
        w0, w1 = max(0, x - self.length // 2), min(w, x + self.length // 2)
        img = img.clone()
        img[:, h0:h1, w0:w1] = 0
        return img


def _posterize_zero_bits_black(img, bits_to_keep, **_):
    """timm 1.0.31 asks for ``posterize(img, 0)`` at magnitude 10; Pillow 13 refuses 0 bits where
    older Pillow (the official runs') returned a black image. Keep the older result."""
    from PIL import Image, ImageOps

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, bits_to_keep)


def torchvision_transform(recipe: str, size: int):
    if recipe == "cifar":
        return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.RandomRotation(15),
                          T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)])
    if recipe == "cifar-selfkd":
        return T.Compose([T.RandomCrop(32, padding=4, fill=128), T.RandomHorizontalFlip(),
                          T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.ToTensor(), Cutout(16),
                          T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    if recipe == "vit":
        return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
                          T.RandAugment(2, 9), T.ToTensor(),
                          T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                          T.RandomErasing(0.25, value="random")])
    if recipe == "vit-official":  # the official ViT code's pipeline, built by timm
        from timm.data import auto_augment, create_transform

        # The ops are looked up in NAME_TO_OP (filled at import), not through the module attribute.
        for name, op in list(auto_augment.NAME_TO_OP.items()):
            if op is auto_augment.posterize:
                auto_augment.NAME_TO_OP[name] = _posterize_zero_bits_black

        return create_transform(input_size=(size, size), is_training=True,
                                auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.25,
                                re_mode="pixel", re_count=1, interpolation="bicubic")
    raise ValueError(recipe)


class PilDataset(Dataset):
    """uint8 HWC arrays -> PIL image per item -> transform, as torchvision's CIFAR dataset does."""

    def __init__(self, data: ArrayData, transform):
        self.data, self.transform = data, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.data.images[i])), int(self.data.labels[i])


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("train")


def subset(data: ArrayData, n: int) -> ArrayData:
    return ArrayData(data.images[:n], data.labels[:n], data.classes, data.source)


CASES = [("cifar", 32, 1024), ("cifar-selfkd", 32, 1024), ("vit", 224, 256), ("vit-official", 224, 256)]


def _n(n: int) -> int:
    return n // 2 if QUICK else n


@pytest.mark.parametrize("recipe,size,n", CASES)
@pytest.mark.parametrize("workers", [2, 0])
def test_torchvision_dataloader(bench, digits, recipe, size, n, workers):
    if QUICK and workers == 0:
        pytest.skip("quick run: the baseline is the 2-worker loader")
    data = subset(digits, _n(n))
    loader = DataLoader(PilDataset(data, torchvision_transform(recipe, size)), batch_size=BATCH,
                        shuffle=True, num_workers=workers, persistent_workers=workers > 0)

    def run():
        for _batch in loader:
            pass

    bench(run, group=f"data {recipe} {size}px", provider=f"torchvision DataLoader ({workers} workers)",
          baseline=workers == 2, note=f"{len(data)} images/round")


@pytest.mark.parametrize("recipe,size,n", CASES)
def test_torch_cpu_batched(bench, digits, recipe, size, n):
    data = subset(digits, _n(n))
    src = TensorSource(data, Augmenter(recipe, size, seed=0), batch_size=BATCH, seed=0)
    state = {"epoch": 0}

    def run():
        for _ in src.epoch(state["epoch"]):
            pass
        state["epoch"] += 1

    bench(run, group=f"data {recipe} {size}px", provider="torch-cpu batched", note=f"{len(data)} images/round")


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")
@pytest.mark.parametrize("recipe,size,n", CASES)
def test_dali_cpu(bench, digits, recipe, size, n):
    from spacedkd_fast.data.dali import DaliSource

    if QUICK and size > 32:
        pytest.skip("quick run: DALI CPU mode at 224 px takes seconds per round")
    if recipe == "vit-official":
        pytest.skip("DALI cannot resample as PIL does; the recipe runs on the torch backends")
    data = subset(digits, _n(n))
    src = DaliSource(data, Augmenter(recipe, size, seed=0), batch_size=BATCH, seed=0, num_threads=2)
    state = {"epoch": 0}

    def run():
        for _ in src.epoch(state["epoch"]):
            pass
        state["epoch"] += 1

    bench(run, group=f"data {recipe} {size}px", provider="DALI CPU mode", note=f"{len(data)} images/round")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe,size,n", CASES)
def test_gpu_resident(bench, digits, recipe, size, n):
    data = subset(digits, _n(n))
    src = TensorSource(data, Augmenter(recipe, size, seed=0), batch_size=BATCH, seed=0, device="cuda")
    state = {"epoch": 0}

    def run():
        for _ in src.epoch(state["epoch"]):
            pass
        torch.cuda.synchronize()
        state["epoch"] += 1

    bench(run, group=f"data {recipe} {size}px", provider="gpu-resident", device="cuda",
          note=f"{len(data)} images/round")
