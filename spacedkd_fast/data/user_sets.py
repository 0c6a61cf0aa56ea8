"""A user's own map-style Datasets as a trainer's :class:`DataBundle`: a keyed training loader
(:class:`KeyedLoader`, so spaced replay stays exact) and a plain test loader, after checks that
turn bad data into one line instead of a collate traceback mid-epoch.

The checks (:class:`BadDataError`, a ``ValueError``):

- an empty data set;
- an item that is not an ``(image, label)`` pair, or whose image is not a tensor (a PIL image
  without a ``ToImage`` / ``ToTensor`` transform);
- a label that is not an integer in ``[0, classes)``;
- images of unequal sizes in one batch when no ``collate_fn`` was given.

They run twice: on a few probed items (and on every label, where the data set lists its labels
as ``targets`` / ``labels``) before anything trains, and on every batch as it is collated, in
whichever worker collates it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torch.utils.data import default_collate as torch_default_collate

PROBE_ITEMS = 8  # items loaded (evenly spaced) by the check before training


class BadDataError(ValueError):
    """Data the trainer cannot use; the message is one line naming the item and the fix.

    Raised inside a ``DataLoader`` worker, torch re-raises it in the main process with the
    worker's traceback folded into the message; ``str()`` gives back the one line."""

    bad_input = True  # the trainer maps errors with this mark to exit status 2

    def __str__(self) -> str:
        text = super().__str__()
        if "Original Traceback" in text:  # re-raised from a worker: keep the original last line
            last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
            name = type(self).__name__ + ": "
            text = last.split(name, 1)[1] if name in last else last
        return text


def _label_of(value: Any, where: str, num_classes: int | None) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value.item())
    elif isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadDataError(f"{where}: the label is {type(value).__name__} {value!r:.40}, not an "
                           "integer class index (map labels to 0 .. classes-1, e.g. with "
                           "target_transform)")
    if value < 0 or (num_classes is not None and value >= num_classes):
        raise BadDataError(f"{where}: label {value} is outside [0, {num_classes}) "
                           "(labels must be class indices 0 .. classes-1)")
    return value


def _image_of(value: Any, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise BadDataError(f"{where}: the image is a {type(value).__module__}.{type(value).__name__}, "
                           "not a tensor; give the Dataset a transform that ends in a tensor "
                           "(torchvision v2.ToImage() + v2.ToDtype(torch.float32, scale=True))")
    if not value.is_floating_point():
        raise BadDataError(f"{where}: the image tensor is {value.dtype}; the models take float "
                           "images (add v2.ToDtype(torch.float32, scale=True) to the transform)")
    return value


def check_items(items: Sequence[Any], num_classes: int | None, what: str = "item",
                indices: Sequence[int] | None = None) -> None:
    """Raise :class:`BadDataError` for the first item that is not a usable ``(image, label)``
    pair, or when the images differ in size (the default collate stacks them)."""
    first: tuple[int, tuple[int, ...]] | None = None
    for n, item in enumerate(items):
        where = f"{what} {indices[n] if indices is not None else n}"
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            shape = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else type(item).__name__
            raise BadDataError(f"{where}: a Dataset item must be an (image, label) pair, got "
                               f"{shape}; return (image, label) from __getitem__ or pass a "
                               "collate_fn that builds (images, labels) batches")
        image = _image_of(item[0], where)
        _label_of(item[1], where, num_classes)
        shape = tuple(image.shape)
        if first is None:
            first = (indices[n] if indices is not None else n, shape)
        elif shape != first[1]:
            raise BadDataError(f"{where}: image of size {'x'.join(map(str, shape))}, but {what} "
                               f"{first[0]} is {'x'.join(map(str, first[1]))}; images of unequal "
                               "sizes cannot be stacked: resize them to one size in the transform "
                               "(v2.Resize(S) + v2.CenterCrop(S)) or pass a collate_fn")


def check_batch(batch: Any, num_classes: int | None, what: str = "batch") -> None:
    """A collated batch must be ``(images [B, ...] float, labels [B] int)`` with labels in range."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise BadDataError(f"{what}: the collate_fn must return (images, labels), got "
                           f"{type(batch).__name__}")
    x, y = batch
    _image_of(x, what)
    if not isinstance(y, Tensor) or y.dim() != 1 or y.is_floating_point() or len(y) != len(x):
        raise BadDataError(f"{what}: labels must be an integer tensor [B] beside images [B, ...]")
    if len(y) and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise BadDataError(f"{what}: label {bad} is outside [0, {num_classes}) (labels must be "
                           "class indices 0 .. classes-1)")


class CheckedCollate:
    """The collate of a user data set, checking what it collates (picklable: it runs in workers).

    Without a user ``collate_fn``: each item is checked (pair, tensor image, label, equal sizes),
    then stacked by torch's ``default_collate``; with one, its output batch is checked."""

    def __init__(self, num_classes: int | None, collate_fn: Callable | None = None,
                 what: str = "training set") -> None:
        self.num_classes = num_classes
        self.collate_fn = collate_fn
        self.what = what

    def __call__(self, items: list[Any]):
        if self.collate_fn is None:
            check_items(items, self.num_classes, what=f"{self.what} item (in a batch)")
            batch = torch_default_collate(items)
        else:
            batch = self.collate_fn(items)
        check_batch(batch, self.num_classes, what=f"{self.what} batch")
        return batch


def listed_labels(dataset: Any) -> np.ndarray | None:
    """Every label of ``dataset`` when it lists them without loading images (torchvision's
    ``targets`` / ``labels`` / ``_labels``, through ``Subset`` and :class:`Transformed`), else
    ``None``."""
    if isinstance(dataset, Subset):
        inner = listed_labels(dataset.dataset)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, Transformed):
        return listed_labels(dataset.dataset)
    for name in ("targets", "labels", "_labels"):
        values = getattr(dataset, name, None)
        if values is None or isinstance(values, str):
            continue
        try:
            arr = np.asarray(values.cpu() if isinstance(values, Tensor) else values)
        except (TypeError, ValueError):
            continue
        if arr.ndim == 1 and len(arr) == len(dataset):
            return arr
    return None


def class_count(dataset: Any, num_classes: int | None, what: str) -> int:
    """``num_classes`` if given, else ``len(dataset.classes)``, else 1 + the largest listed label."""
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise BadDataError(f"num_classes must be an int >= 1, got {num_classes!r}")
        return num_classes
    base = dataset.dataset if isinstance(dataset, (Subset, Transformed)) else dataset
    classes = getattr(base, "classes", None)
    if classes is not None and not isinstance(classes, str) and len(classes) > 0:
        return len(classes)
    labels = listed_labels(dataset)
    if labels is not None and len(labels) and np.issubdtype(labels.dtype, np.integer):
        return int(labels.max()) + 1
    raise BadDataError(f"cannot tell the number of classes of the {what} (it has no .classes "
                       "and lists no labels): pass num_classes=")


@contextmanager
def _global_generators_kept():
    """Torch's (CPU), numpy's and Python's global generator states, put back on exit."""
    states = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def check_dataset(dataset: Any, num_classes: int, what: str,
                  collate_fn: Callable | None = None) -> tuple[int, ...]:
    """The checks of the module docstring on ``dataset`` before training: its size, every listed
    label, and :data:`PROBE_ITEMS` evenly spaced items collated as one batch. Returns the shape
    of one image of the probe batch (``(C, H, W)``)."""
    try:
        n = len(dataset)
    except TypeError:
        raise BadDataError(f"the {what} has no len(): a map-style Dataset (__len__ and "
                           "__getitem__) is needed") from None
    if n == 0:
        raise BadDataError(f"the {what} is empty (len 0)")
    labels = listed_labels(dataset)
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise BadDataError(f"the {what}'s labels are {labels.dtype}, not integer class "
                               "indices")
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(bad):
            i = int(bad[0])
            raise BadDataError(f"the {what}'s item {i} has label {int(labels[i])}, outside "
                               f"[0, {num_classes}) ({len(bad)} such labels)")
    indices = sorted({i * n // min(n, PROBE_ITEMS) for i in range(min(n, PROBE_ITEMS))})
    with _global_generators_kept():  # the probe's random transforms leave the caller's draws be
        items = [dataset[i] for i in indices]
    if collate_fn is None:
        check_items(items, num_classes, what=f"{what} item", indices=indices)
        shape = tuple(items[0][0].shape)
    else:
        batch = collate_fn(items)
        check_batch(batch, num_classes, what=f"the {what}'s collate_fn output")
        shape = tuple(batch[0].shape[1:])
    if len(shape) != 3 or shape[0] != 3:
        raise BadDataError(f"the {what}'s images are {'x'.join(map(str, shape))}; the models take "
                           "3-channel images C x H x W (add v2.RGB() to the transform of "
                           "grayscale images)")
    return shape


class Transformed(torch.utils.data.Dataset):
    """``dataset`` with ``transform`` applied to each image and the label made an ``int``."""

    def __init__(self, dataset: Any, transform: Callable | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            return item  # the collate check names it
        image, label = item
        return (self.transform(image) if self.transform is not None else image), label


def default_workers() -> int:
    """Loader worker processes when none are asked for: the cores but one, at most 8."""
    import os

    return max(0, min(8, (os.cpu_count() or 1) - 1))


def test_loader(dataset: Any, collate: Callable, *, batch_size: int, num_workers: int,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """A plain, unshuffled loader over this rank's share (items ``rank::world_size``)."""
    share = dataset if world_size == 1 else Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(share, batch_size=max(1, batch_size // world_size), shuffle=False,
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory)


def build_user_data(train_set: Any, test_set: Any, *, num_classes: int | None = None,
                    batch_size: int = 128, seed: int = 0, device: str | torch.device = "cpu",
                    rank: int = 0, world_size: int = 1, drop_last: bool = False,
                    num_workers: int | None = None, collate_fn: Callable | None = None,
                    name: str = "user data", description: str = "", image_size: int | None = None):
    """A :class:`~spacedkd_fast.data.build.DataBundle` over a user's map-style Datasets.

    ``train`` is a :class:`~spacedkd_fast.data.keyed_loader.KeyedLoader` (shuffled per epoch,
    the user's transforms replayed exactly under the engine's keys), ``test()`` a plain loader
    over this rank's share of ``test_set``. Items are ``(image tensor [3, H, W] float, int label)``
    or whatever ``collate_fn`` turns into ``(images, labels)``. ``num_classes``: default
    ``len(train_set.classes)`` or 1 + the largest listed label. ``num_workers``: default
    :func:`default_workers`. Bad data raises :class:`BadDataError` (one line).
    """
    from .build import DataBundle
    from .keyed_loader import KeyedLoader

    device = torch.device(device)
    classes = class_count(train_set, num_classes, "training set")
    shape = check_dataset(train_set, classes, "training set", collate_fn)
    check_dataset(test_set, classes, "test set", collate_fn)
    workers = default_workers() if num_workers is None else int(num_workers)
    pin = device.type == "cuda"
    train = KeyedLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                        num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                        collate_fn=CheckedCollate(classes, collate_fn, "training set"),
                        seed=seed, rank=rank, world_size=world_size)
    if train.steps_per_epoch < 1:
        raise BadDataError(f"the training set has {len(train_set)} items: not one batch of "
                           f"{batch_size} with the last partial batch dropped")
    test_collate = CheckedCollate(classes, collate_fn, "test set")

    def test():
        return test_loader(test_set, test_collate, batch_size=batch_size, num_workers=workers,
                           rank=rank, world_size=world_size, pin_memory=pin)

    if image_size is not None and image_size != shape[-1]:
        raise BadDataError(f"the training images are {'x'.join(map(str, shape[1:]))} px but the "
                           f"image size asked for is {image_size}: resize them in the transform "
                           "(a MODULE:FUNCTION factory is given image_size= when it names it)")
    size = image_size or int(shape[-1])
    announcement = (f"data set {description or name}: {len(train_set)} train / {len(test_set)} "
                    f"test images, {classes} classes, {'x'.join(map(str, shape[1:]))} px, keyed "
                    f"loader with {workers} worker{'s' if workers != 1 else ''}, "
                    f"{train.steps_per_epoch} steps per epoch"
                    + (" (last partial batch dropped)" if drop_last else ""))
    return DataBundle(train=train, test=test, num_classes=classes, image_size=size, name=name,
                      backend="keyed-loader", announcement=announcement, recipe="")


def is_factory(spec: str) -> bool:
    """``module:factory`` (a dotted module path, a colon, a name); ``folder:`` and
    ``torchvision:`` are the trainer's own prefixes."""
    head, sep, tail = spec.partition(":")
    return (bool(sep) and head not in ("folder", "torchvision") and tail.isidentifier()
            and all(part.isidentifier() for part in head.split(".")))


def factory_sets(spec: str, **offered: Any) -> tuple[Any, Any, int | None]:
    """Call the ``module:factory`` named by ``spec``: ``(train_set, test_set, num_classes)``.

    The factory returns ``(train_set, test_set)`` or ``(train_set, test_set, num_classes)``; it
    receives those of ``offered`` (``data_dir``, ``download``, ``image_size``, ``seed``) that its
    signature names."""
    import importlib
    import inspect

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BadDataError(f"--dataset {spec}: cannot import {module_name} ({err}); it must be "
                           "importable from the current folder or PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BadDataError(f"--dataset {spec}: {module_name} has no callable {attr!r}")
    params = inspect.signature(factory).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    result = factory(**{k: v for k, v in offered.items() if takes_all or k in params})
    if not (isinstance(result, (tuple, list)) and len(result) in (2, 3)):
        raise BadDataError(f"--dataset {spec}: the factory must return (train_set, test_set) or "
                           f"(train_set, test_set, num_classes), got {type(result).__name__}")
    train_set, test_set, *rest = result
    return train_set, test_set, (rest[0] if rest else None)
