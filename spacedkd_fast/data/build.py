"""``build_data``: data set + recipe + backend -> a :class:`DataBundle` for the trainer.

Backends (``backend=``): ``"auto"`` picks ``gpu-resident`` for in-memory data sets on a CUDA
device, ``dali`` for image folders on a CUDA device (when DALI imports and the recipe does not
resample as PIL does), ``torchvision`` for the other image folders and for Tiny-ImageNet on a CPU
device (when the recipe has a torchvision form), ``torch-cpu`` otherwise. Overrides: ``"gpu"`` /
``"gpu-resident"``, ``"cpu"`` / ``"torch-cpu"`` (batched tensor ops on the CPU, deliver to
``device``), ``"dali"`` (CPU mode on a CPU device), ``"torchvision"`` (the recipe as per-image
torchvision / timm transforms, :mod:`.torchvision_recipes`, in a :class:`KeyedLoader`'s workers).
The announcement names the one that runs. ``auto`` resolves from the device, the data set and
the recipe alone (and DALI's presence on CUDA), so a resumed run resolves it as its start did.

Why ``torchvision`` is the CPU default for folders: at 224 px the batched ``torch-cpu`` ops stay
under a plain torchvision ``DataLoader``'s images/s on 2 cores (``vit`` 0.77x, ``vit-official``
0.20x idle; ``benchmarks/RESULTS.md``, keyed loader section; issue 18 asks for >= 1.0x, or this
default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augmenter,
    Recipe,
    get_recipe,
)
from .datasets import (
    FileData,
    cifar_present,
    load_cifar,
    load_digits_split,
    load_tiny_imagenet,
    scan_image_folder,
)
from .sources import FileSource, TensorSource, tensor_eval_batches
from .user_sets import build_user_data, factory_sets, is_factory

log = logging.getLogger("spacedkd_fast.data")

DATASETS = ("cifar100", "cifar10", "tiny-imagenet", "imagenet", "folder:<path>", "digits",
            "torchvision:<Class>", "<module>:<factory>")
BACKENDS = ("auto", "gpu", "gpu-resident", "cpu", "torch-cpu", "dali", "torchvision")
# data sets that auto sends to the torchvision backend on a CPU (read from image files, or decoded
# from them: Tiny-ImageNet); in-memory sets (CIFAR, digits) keep the batched torch-cpu backend
_TORCHVISION_AUTO = ("imagenet", "folder", "tiny-imagenet")
_DEFAULT_RECIPE = {"cifar100": "cifar", "cifar10": "cifar", "digits": "cifar", "tiny-imagenet": "tiny",
                   "imagenet": "imagenet", "folder": "imagenet"}
_DEFAULT_SIZE = {"cifar100": 32, "cifar10": 32, "digits": 32, "tiny-imagenet": 64, "imagenet": 224,
                 "folder": 224}


@dataclass
class DataBundle:
    """What the trainer needs from the data side.

    ``train``: a ``ReplayableSource`` (``steps_per_epoch``, ``epoch(e)``, ``batch(key)``, plus
    ``num_samples``); ``test()``: an iterable of unaugmented, normalised ``(x [B, 3, S, S] float32,
    y [B] int64)`` batches on the training device; ``backend``: the backend in use.
    """

    train: object
    test: Callable[[], Iterable[tuple[Tensor, Tensor]]]
    num_classes: int
    image_size: int
    name: str
    backend: str
    announcement: str
    recipe: str = ""

    def close(self) -> None:
        """Stop the training source's worker processes now (those it has: ``KeyedLoader``)."""
        close = getattr(self.train, "close", None)
        if callable(close):
            close()


def _load(dataset: str, data_dir: str, download: bool):
    """-> (kind, train data, test data, classes, mean, std, description)."""
    if dataset in ("cifar100", "cifar10"):
        n = 100 if dataset == "cifar100" else 10
        tr = load_cifar(data_dir, n, "train", download=download)
        te = load_cifar(data_dir, n, "test", download=False)
        mean, std = (CIFAR100_MEAN, CIFAR100_STD) if n == 100 else (CIFAR10_MEAN, CIFAR10_STD)
        return dataset, tr, te, tr.classes, mean, std, f"CIFAR-{n}"
    if dataset == "tiny-imagenet":
        tr = load_tiny_imagenet(data_dir, "train")
        te = load_tiny_imagenet(data_dir, "val")
        return dataset, tr, te, tr.classes, IMAGENET_MEAN, IMAGENET_STD, "Tiny-ImageNet-200"
    if dataset == "imagenet" or dataset.startswith("folder:"):
        root = Path(data_dir) / "imagenet" if dataset == "imagenet" else Path(dataset[len("folder:"):])
        tr = scan_image_folder(root, "train")
        te = scan_image_folder(root, "val")
        if te.classes != tr.classes:
            raise ValueError(f"{root}: train and val class folders differ "
                             f"({len(tr.classes)} vs {len(te.classes)} classes)")
        kind = "imagenet" if dataset == "imagenet" else "folder"
        return kind, tr, te, tr.classes, IMAGENET_MEAN, IMAGENET_STD, f"image folder {root}"
    if dataset == "digits":
        tr = load_digits_split("train")
        te = load_digits_split("test")
        mean = tuple(float(v) for v in tr.images.reshape(-1, 3).mean(0) / 255.0)
        std = tuple(float(v) for v in tr.images.reshape(-1, 3).std(0) / 255.0)
        return "digits", tr, te, tr.classes, mean, std, "embedded digits"
    raise ValueError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")


def _choose_backend(backend: str, device: torch.device, files: bool, pil_resample: bool = False,
                    kind: str = "", recipe: Recipe | None = None) -> tuple[str, str]:
    from .dali import dali_available
    from .torchvision_recipes import unsupported

    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    no_torchvision = unsupported(recipe) if recipe is not None else "no recipe"
    if backend == "auto":
        if device.type == "cuda" and not files:
            return "gpu-resident", "in-memory data set on a CUDA device"
        if device.type == "cuda" and files and dali_available() and not pil_resample:
            return "dali", "image folder on a CUDA device"
        why = ("no CUDA device" if device.type != "cuda" else
               "the recipe resamples as PIL does" if pil_resample else "DALI not installed")
        # the CPU pipeline for image files: the torchvision form where the recipe has one (on
        # CUDA: image folders that DALI cannot take)
        if kind in _TORCHVISION_AUTO and (device.type != "cuda" or files):
            if no_torchvision is None:
                return "torchvision", ("image files on a CPU device" if device.type != "cuda"
                                       else f"image folder on a CUDA device, {why}")
            return "torch-cpu", f"{why}; {no_torchvision}"
        return "torch-cpu", why
    if backend in ("gpu", "gpu-resident"):
        if device.type != "cuda":
            raise ValueError(f"backend {backend!r} needs a CUDA device, got device={device}")
        if files:
            raise ValueError("the gpu-resident backend holds in-memory data sets; image folders use "
                             "backend 'dali' or 'cpu'")
        return "gpu-resident", "requested"
    if backend == "dali":
        if not dali_available():
            raise ImportError("backend 'dali' needs nvidia-dali (pip install nvidia-dali-cuda130)")
        return "dali", "requested"
    if backend == "torchvision":
        if no_torchvision is not None:
            raise ValueError(f"data backend 'torchvision': {no_torchvision}; use --data-backend cpu")
        return "torchvision", "requested"
    return "torch-cpu", "requested"


def build_data(dataset: str | None, *, data_dir: str = "./data", recipe: str | None = None,
               batch_size: int = 128, seed: int = 0, device: str | torch.device = "cpu",
               backend: str = "auto", rank: int = 0, world_size: int = 1, download: bool = False,
               image_size: int | None = None, drop_last: bool | None = None) -> DataBundle:
    """Build the training source and test loader of ``dataset``.

    ``dataset``: ``"cifar100"``, ``"cifar10"``, ``"tiny-imagenet"``, ``"imagenet"`` (read from
    ``<data_dir>/imagenet/{train,val}``), ``"folder:<path>"`` (``<path>/{train,val}/<class>/``),
    ``"digits"``, or ``None`` (CIFAR-100 if it is under ``data_dir``, else the embedded digits,
    announced). A named data set missing on disk raises ``FileNotFoundError`` naming the folder.
    ``batch_size`` is the global batch: rank ``r`` gets rows ``r::world_size`` of each batch.
    ``drop_last``: drop the last partial training batch; ``None`` takes the recipe's default
    (``vit-official``: True, as the official loaders: CIFAR-100 at batch 128 gives 390 steps).

    ``"torchvision:<Class>"`` (any ``torchvision.datasets`` class, with torchvision transforms:
    :mod:`.torchvision_sets`) and ``"<module>:<factory>"`` (a function returning the user's own
    ``(train_set, test_set[, num_classes])``) train through a :class:`KeyedLoader`
    (:func:`.user_sets.build_user_data`); ``recipe`` is then one of
    ``torchvision_sets.AUGMENTATIONS`` (a factory's sets carry their own transforms).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch sees no CUDA device here; use "
                         "device='cpu'")
    if dataset is not None and (dataset.startswith("torchvision:") or is_factory(dataset)):
        return _build_user_sets(dataset, data_dir=data_dir, recipe=recipe, batch_size=batch_size,
                                seed=seed, device=device, rank=rank, world_size=world_size,
                                download=download, image_size=image_size, drop_last=drop_last)
    fallback_note = ""
    if dataset is None:
        if cifar_present(data_dir, 100):
            dataset = "cifar100"
        else:
            dataset = "digits"
            fallback_note = (f"CIFAR-100 not found under {data_dir}; training on the embedded digits "
                             "data set (1,797 8x8 scanned digits, bundled with scikit-learn)")
    kind, tr, te, classes, mean, std, desc = _load(dataset, data_dir, download)
    recipe_name = recipe or _DEFAULT_RECIPE[kind]
    rec = get_recipe(recipe_name)
    size = image_size or (224 if recipe_name in ("vit", "vit-official") else _DEFAULT_SIZE[kind])
    if drop_last is None:
        drop_last = rec.drop_last
    files = isinstance(tr, FileData)
    pil_resample = "pil" in rec.resample or "pil" in rec.test_resample
    chosen, why = _choose_backend(backend, device, files, pil_resample, kind, rec)
    if chosen == "torchvision":
        return _build_torchvision(tr, te, classes, kind=kind, description=desc, recipe=rec,
                                  size=size, mean=mean, std=std, why=why, batch_size=batch_size,
                                  seed=seed, device=device, rank=rank, world_size=world_size,
                                  drop_last=drop_last)
    aug = Augmenter(rec, size, seed=seed, mean=mean, std=std)
    test_aug = Augmenter(rec, size, seed=seed, mean=mean, std=std)
    common = dict(batch_size=batch_size, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size)

    if chosen == "dali":
        from .dali import DaliSource

        train = DaliSource(tr, aug, device=device, **common)
        test_src = DaliSource(te, test_aug, device=device, **common)
        backend_name = train.backend

        def test():
            return test_src.eval_batches(batch_size)
    elif files:
        train = FileSource(tr, aug, device=device, **common)
        test_src = FileSource(te, test_aug, device=device, **common)
        backend_name = "torch-cpu"

        def test():
            return test_src.eval_batches(batch_size)
    else:
        src_device = device if chosen == "gpu-resident" else torch.device("cpu")
        train = TensorSource(tr, aug, device=src_device, out_device=device, **common)
        backend_name = train.backend
        test_images = torch.from_numpy(te.images).permute(0, 3, 1, 2).contiguous().to(device)
        test_labels = torch.from_numpy(np.asarray(te.labels)).to(device)

        def test():
            return tensor_eval_batches(test_images, test_labels, test_aug, batch_size, rank=rank,
                                       world_size=world_size)

    head = fallback_note or f"data set {desc}"
    announcement = (f"{head}: {len(tr)} train / {len(te)} test images, {len(classes)} classes, "
                    f"{size} px, recipe '{recipe_name}', backend {backend_name} ({why}), "
                    f"{train.steps_per_epoch} steps per epoch"
                    + (" (last partial batch dropped)" if drop_last else ""))
    log.info(announcement)
    return DataBundle(train=train, test=test, num_classes=len(classes), image_size=size, name=kind,
                      backend=backend_name, announcement=announcement, recipe=recipe_name)


def _build_torchvision(tr, te, classes, *, kind: str, description: str, recipe: Recipe, size: int,
                       mean, std, why: str, batch_size: int, seed: int, device: torch.device,
                       rank: int, world_size: int, drop_last: bool) -> DataBundle:
    """The ``torchvision`` backend: the recipe as torchvision / timm transforms
    (:mod:`.torchvision_recipes`) over a :class:`KeyedLoader` with :func:`default_workers`."""
    from .torchvision_recipes import RecipeImages, eval_transform, train_transform
    from .user_sets import default_workers

    mean = recipe.mean or mean
    std = recipe.std or std
    workers = default_workers()
    train_set = RecipeImages(tr, train_transform(recipe, size, mean, std))
    test_set = RecipeImages(te, eval_transform(recipe, size, mean, std))
    bundle = build_user_data(train_set, test_set, num_classes=len(classes), batch_size=batch_size,
                             seed=seed, device=device, rank=rank, world_size=world_size,
                             drop_last=drop_last, num_workers=workers, name=kind,
                             description=description, image_size=size)
    bundle.backend = "torchvision"
    bundle.recipe = recipe.name
    bundle.announcement = (
        f"data set {description}: {len(tr)} train / {len(te)} test images, {len(classes)} "
        f"classes, {size} px, recipe '{recipe.name}' as torchvision/timm transforms, backend "
        f"torchvision ({why}; keyed loader with {workers} worker{'s' if workers != 1 else ''}), "
        f"{bundle.train.steps_per_epoch} steps per epoch"
        + (" (last partial batch dropped)" if drop_last else ""))
    log.info(bundle.announcement)
    return bundle


def _build_user_sets(dataset: str, *, data_dir: str, recipe: str | None, batch_size: int, seed: int,
                     device: torch.device, rank: int, world_size: int, download: bool,
                     image_size: int | None, drop_last: bool | None) -> DataBundle:
    """``torchvision:<Class>`` or ``<module>:<factory>`` through the keyed loader."""
    if dataset.startswith("torchvision:"):
        from .torchvision_sets import load_torchvision

        sets = load_torchvision(dataset.partition(":")[2], data_dir, download=download,
                                image_size=image_size, augment=recipe)
        train_set, test_set, classes = sets.train, sets.test, sets.num_classes
        description, size, recipe_name = sets.description, sets.image_size, sets.augment
    else:
        if recipe not in (None, "none"):
            raise ValueError(f"--augment {recipe}: the sets of {dataset} carry their own "
                             "transforms (leave --augment out)")
        train_set, test_set, classes = factory_sets(dataset, data_dir=data_dir, download=download,
                                                    image_size=image_size, seed=seed)
        description, size, recipe_name = dataset, image_size, "none"
    bundle = build_user_data(train_set, test_set, num_classes=classes, batch_size=batch_size,
                             seed=seed, device=device, rank=rank, world_size=world_size,
                             drop_last=bool(drop_last), name=dataset, description=description,
                             image_size=size)
    bundle.recipe = recipe_name
    log.info(bundle.announcement)
    return bundle
