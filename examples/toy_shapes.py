"""A stand-in for your own data set: 32 px RGB pictures of a square, a disc or a triangle (the
label), in random colours, sizes and places. Items are ``(PIL image, label)``, as torchvision's
data sets give them; ``transform`` is applied to the image.

Each picture is drawn from its own generator seeded by ``(seed, index)``, so ``dataset[i]`` is the
same picture every time: only the transforms are random, and the keyed loader replays those.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASSES = ["square", "disc", "triangle"]


class ToyShapes(torch.utils.data.Dataset):
    classes = CLASSES

    def __init__(self, n: int, *, seed: int = 0, size: int = 32, transform=None) -> None:
        self.n, self.seed, self.size, self.transform = n, seed, size, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, i))  # the picture's own draws, not augmentation
        label = int(rng.integers(len(CLASSES)))
        s = self.size
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = Image.new("RGB", (s, s), background)
        r = rng.uniform(0.2, 0.4) * s
        cx, cy = rng.uniform(r, s - r, 2)
        draw = ImageDraw.Draw(image)
        if label == 0:
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif label == 1:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        return (self.transform(image) if self.transform is not None else image), label


def example_args(description: str, epochs: int = 6):
    """The examples' shared options: ``--epochs``, ``--train-images``, ``--workers`` and
    ``--tiny`` (a few seconds' run, what CI runs: 2 epochs, 128 images, 1 worker)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (CI)")
    args = parser.parse_args()
    if args.tiny:
        args.epochs, args.train_images, args.workers = 2, 128, 1
    return args
