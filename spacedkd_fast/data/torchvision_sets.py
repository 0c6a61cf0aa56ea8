"""``torchvision:NAME``: any ``torchvision.datasets`` classification class as the trainer's data.

The class is built twice, for its training and its test split, from what its signature takes:
``train=True`` / ``False`` (MNIST, FashionMNIST, CIFAR, ...), or ``split=`` the first value the
class accepts of ``train`` / ``trainval`` and ``test`` / ``val`` (SVHN, STL10, Flowers102, Food101,
OxfordIIITPet, ImageNet, ...), with ``root`` and ``download`` as given.

Images go through torchvision transforms, per sample, in the keyed loader's workers (so the
engine replays them exactly):

- ``v2.ToImage()`` then ``v2.RGB()``: the package's models take 3 channels, so grayscale images
  (FashionMNIST, MNIST) are repeated into three (the simplest path that every model takes);
- the size: ``image_size`` when given, else the first training image's side when it is square,
  else 224 (data sets of mixed sizes); ``Resize`` + ``CenterCrop`` to it (nothing when the image
  is that size already);
- the augmentation (:data:`AUGMENTATIONS`; default ``cifar`` up to 64 px, ``imagenet`` above);
- float in [0, 1], normalised with the training split's per-channel mean and std, measured on
  :data:`STATS_ITEMS` evenly spaced training images (announced).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

STATS_ITEMS = 512
TRAIN_SPLITS = ("train", "trainval")
TEST_SPLITS = ("test", "val")


def _augmentations(name: str, size: int) -> list:
    from torchvision.transforms import v2

    table = {
        "none": [],
        # as the package's cifar recipe: pad-and-crop by 1/8 of the side, flip, rotate 15 degrees
        "cifar": [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip(),
                  v2.RandomRotation(15)],
        "imagenet": [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()],
    }
    if name not in table:
        raise ValueError(f"with a torchvision:NAME data set, --augment takes {', '.join(AUGMENTATIONS)} "
                         f"(torchvision transforms, per sample), got {name!r}")
    return table[name]


AUGMENTATIONS = ("none", "cifar", "imagenet")


@dataclass
class TorchvisionSplits:
    train: Any  # Transformed(torchvision data set, train transform)
    test: Any
    num_classes: int
    image_size: int
    augment: str
    description: str


def find_class(name: str):
    """The ``torchvision.datasets`` class called ``name`` (case-insensitive)."""
    import torchvision.datasets as tvd

    classes = {n.lower(): getattr(tvd, n) for n in dir(tvd)
               if isinstance(getattr(tvd, n), type) and issubclass(getattr(tvd, n), torch.utils.data.Dataset)}
    cls = classes.get(name.lower())
    if cls is None:
        raise ValueError(f"torchvision.datasets has no data set class {name!r} (for example "
                         "FashionMNIST, CIFAR10, SVHN, STL10, Flowers102)")
    return cls


def _construct(cls, root: str, train: bool, download: bool):
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    if "download" in params:
        kwargs["download"] = download
    if "train" in params and "split" not in params:
        return _open(cls, root, download, train=train, **kwargs)
    if "split" not in params:
        raise ValueError(f"torchvision.datasets.{cls.__name__} has no train/test split argument; "
                         "split it yourself and hand the sets to spacedkd_fast.train.run(config, "
                         "train_set=..., test_set=...)")
    last: Exception | None = None
    for split in (TRAIN_SPLITS if train else TEST_SPLITS):
        try:
            return _open(cls, root, download, split=split, **kwargs)
        except ValueError as err:  # torchvision's "Unknown value 'x' for argument split"
            if "split" not in str(err):
                raise
            last = err
    raise ValueError(f"torchvision.datasets.{cls.__name__}: no {'training' if train else 'test'} "
                     f"split among {TRAIN_SPLITS if train else TEST_SPLITS} ({last})")


def _open(cls, root: str, fetch: bool, **kwargs):
    try:
        return cls(root, **kwargs)
    except RuntimeError as err:
        first = (str(err).strip().splitlines() or [""])[0]
        if fetch:
            raise FileNotFoundError(f"torchvision {cls.__name__}: could not fetch it into {root} "
                                    f"({first})") from None
        raise FileNotFoundError(f"torchvision {cls.__name__}: its files are not under {root} "
                                f"(torchvision says: {first}){_layout_hint(cls, root)}; pass "
                                f"--download where a network exists, or put the files there "
                                f"(--data-dir)") from None
    except OSError as err:  # a failed download (no network) or an unreadable file
        raise FileNotFoundError(f"torchvision {cls.__name__} under {root}: "
                                f"{err.strerror or err}") from None


def _layout_hint(cls, root) -> str:
    """Where torchvision looks, for the classes whose layout users get wrong most: the MNIST
    family reads uncompressed ``*-ubyte`` files from ``<root>/<Class>/raw/`` (Debian's
    ``dataset-fashion-mnist`` ships ``.gz`` files in a flat folder)."""
    from torchvision.datasets import MNIST

    if isinstance(cls, type) and issubclass(cls, MNIST):
        return (f"; it reads the uncompressed *-ubyte files from {root}/{cls.__name__}/raw/ "
                "(gunzip the .gz files into that folder)")
    return ""


def _base_transforms(size: int | None) -> list:
    from torchvision.transforms import v2

    steps = [v2.ToImage(), v2.RGB()]
    if size is not None:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    return steps


def _native_size(dataset) -> int | None:
    from torchvision.transforms import v2

    image = v2.Compose([v2.ToImage()])(dataset[0][0])
    h, w = image.shape[-2:]
    return int(h) if h == w else None


def channel_stats(dataset, size: int | None, items: int = STATS_ITEMS
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of ``items`` evenly spaced images of ``dataset``,
    after the size and channel steps (float64 sums)."""
    from torchvision.transforms import v2

    prep = v2.Compose(_base_transforms(size) + [v2.ToDtype(torch.float64, scale=True)])
    n = len(dataset)
    k = min(n, items)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in range(k):
        x = prep(dataset[i * n // k][0]).reshape(3, -1)
        total += x.sum(1)
        total_sq += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def load_torchvision(name: str, root: str, *, download: bool = False, image_size: int | None = None,
                     augment: str | None = None) -> TorchvisionSplits:
    """The training and test splits of ``torchvision.datasets.<name>`` with the module
    docstring's transforms. Missing files raise ``FileNotFoundError`` naming the class and
    ``root``; a class without a split, or an unknown name, ``ValueError``."""
    from torchvision.transforms import v2

    from .user_sets import BadDataError, Transformed, class_count

    cls = find_class(name)
    train_raw = _construct(cls, root, True, download)
    test_raw = _construct(cls, root, False, download)
    if len(train_raw) == 0:
        raise BadDataError(f"torchvision {cls.__name__} under {root}: the training split is empty")
    native = _native_size(train_raw)
    size = image_size or native or 224
    resize = None if size == native else size
    augment = augment or ("cifar" if size <= 64 else "imagenet")
    mean, std = channel_stats(train_raw, resize)
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train_tf = v2.Compose(_base_transforms(resize) + _augmentations(augment, size) + tail)
    test_tf = v2.Compose(_base_transforms(resize) + tail)
    classes = class_count(train_raw, None, f"torchvision {cls.__name__} training split")
    stats = ", ".join(f"{m:.3f}/{s:.3f}" for m, s in zip(mean, std))
    description = (f"torchvision {cls.__name__} ({root}; augment '{augment}', mean/std per "
                   f"channel {stats})")
    return TorchvisionSplits(Transformed(train_raw, train_tf), Transformed(test_raw, test_tf),
                             classes, int(size), augment, description)
