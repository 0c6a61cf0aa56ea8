"""The package's recipes (:data:`.augment.RECIPES`) as per-image torchvision / timm transforms,
for the ``torchvision`` data backend: image folders (and Tiny-ImageNet) through a
:class:`~.keyed_loader.KeyedLoader` with ``DataLoader`` workers.

Why a second form of the recipes: on a CPU, the batched tensor ops of the ``torch-cpu`` backend
at 224 px reach only a fraction of a plain torchvision ``DataLoader``'s images/s (issue 18,
``benchmarks/RESULTS.md``, KeyedLoader section), so the trainer's CPU default for image folders
is this form. It is keyed and replays exactly (the keyed loader seeds each sample's draws), but
its draws are torchvision's / timm's own: the same key gives other pixels than the batched
backends.

Per recipe (``S`` the output size; images decoded to RGB PIL images first):

- ``imagenet``: ``RandomResizedCrop(S)`` + flip; test ``Resize(S / 0.875)`` + ``CenterCrop(S)``
  (resize 256 / crop 224);
- ``vit``: ``RandomResizedCrop(S)`` + flip + ``RandAugment`` (2 ops, magnitude 9, filled with
  the recipe's fill) + normalise + ``RandomErasing(0.25)`` with per-pixel normal noise;
- ``vit-official``: timm's ``create_transform(S, is_training=True,
  auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", interpolation="bicubic")``
  itself, as the official ViT code builds it; test ``Resize((S, S))`` bilinear;
- ``cifar`` / ``tiny`` / ``none``: ``Resize((S, S))`` when the image is not ``S`` px, then
  ``RandomCrop(S, padding)`` + flip (+ ``RandomRotation(15)`` for ``cifar``);
- ``cifar-selfkd``: none (torchvision has no Cutout): :func:`unsupported` says so.

Every training transform ends in a normalised ``float32 [3, S, S]`` tensor; test transforms
resize as the recipe's test transform (``test_crop_fraction``), then normalise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import Recipe
from .datasets import ArrayData, FileData, decode_image


def unsupported(recipe: Recipe) -> str | None:
    """Why ``recipe`` has no torchvision form (``None`` when it has one)."""
    if recipe.cutout_length:
        return f"recipe '{recipe.name}' uses Cutout, which torchvision does not have"
    if recipe.name == "vit-official":
        try:
            import timm.data  # noqa: F401
        except ImportError:
            return "recipe 'vit-official' runs timm's create_transform, and timm is not installed"
    return None


def _interpolation(resample: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC if "bicubic" in resample else InterpolationMode.BILINEAR


def train_transform(recipe: Recipe, size: int, mean, std):
    """The training transform of ``recipe``: RGB PIL image -> normalised ``float32 [3, S, S]``."""
    why = unsupported(recipe)
    if why is not None:
        raise ValueError(f"data backend 'torchvision': {why}; use --data-backend cpu")
    if recipe.name == "vit-official":
        from timm.data import create_transform

        # the official ViT code's call, word for word (OFFICIAL_VIT_FACTS 1.1)
        transform = create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                     re_prob=0.25, re_mode="pixel", interpolation="bicubic")
        return _posterize_zero_bits_black(transform)
    from torchvision.transforms import v2

    steps: list[Any] = []
    if recipe.random_resized_crop:
        steps.append(v2.RandomResizedCrop(size, scale=recipe.rrc_scale, ratio=recipe.rrc_ratio,
                                          interpolation=_interpolation(recipe.resample),
                                          antialias=True))
    else:
        steps.append(v2.Resize((size, size), interpolation=_interpolation(recipe.resample),
                               antialias=True))
        if recipe.crop_padding:
            steps.append(v2.RandomCrop(size, padding=recipe.crop_padding, fill=recipe.crop_fill))
    if recipe.flip:
        steps.append(v2.RandomHorizontalFlip())
    if recipe.rotate_degrees:
        steps.append(v2.RandomRotation(recipe.rotate_degrees))
    fill = recipe.policy_fill
    fill = list(fill) if isinstance(fill, tuple) else fill
    if recipe.policy == "randaugment":
        steps.append(v2.RandAugment(num_ops=recipe.randaugment_ops,
                                    magnitude=int(recipe.randaugment_magnitude), fill=fill))
    elif recipe.policy == "autoaugment-cifar10":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=fill))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if recipe.erasing_p:
        steps.append(v2.RandomErasing(p=recipe.erasing_p, value="random"))
    return v2.Compose(steps)


def posterize_keeping_zero_bits(img, bits_to_keep, **_):
    """timm's posterize, where 0 bits (asked for at magnitude 10: the ``mstd0.5`` magnitude
    reaches it about once in 40 draws) give a black image as the Pillow of the official runs
    did; Pillow 13 refuses 0 bits, which would stop a worker mid-epoch."""
    from PIL import Image, ImageOps

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, bits_to_keep)


def _posterize_zero_bits_black(transform):
    """``transform`` (timm's) with its RandAugment posterize ops replaced by
    :func:`posterize_keeping_zero_bits`, on this transform's op objects only (timm's op table is
    left as it is)."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_keeping_zero_bits
    return transform


def eval_transform(recipe: Recipe, size: int, mean, std):
    """The evaluation transform: the recipe's test resize (``test_crop_fraction`` < 1: resize the
    short side to ``S / fraction`` and centre-crop ``S``; else resize to ``S x S``), normalised."""
    from torchvision.transforms import v2

    how = _interpolation(recipe.test_resample)
    if recipe.test_crop_fraction < 1.0:
        resize = [v2.Resize(round(size / recipe.test_crop_fraction), interpolation=how,
                            antialias=True), v2.CenterCrop(size)]
    else:
        resize = [v2.Resize((size, size), interpolation=how, antialias=True)]
    return v2.Compose(resize + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                v2.Normalize(mean, std)])


class RecipeImages(Dataset):
    """``(transform(RGB PIL image), label)`` items of image files (:class:`FileData`, decoded per
    item; an unreadable file raises ``UnreadableImageError`` naming it) or of decoded images
    (:class:`ArrayData`). Lists its labels (``targets``) and ``classes`` for the loader's checks."""

    def __init__(self, data: FileData | ArrayData, transform) -> None:
        self.data = data
        self.transform = transform
        self.targets = np.asarray(data.labels, dtype=np.int64)
        self.classes = list(data.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        if isinstance(self.data, FileData):
            pixels = decode_image(self.data.paths[i])
        else:
            pixels = self.data.images[i]
        return self.transform(Image.fromarray(pixels)), int(self.targets[i])
