"""A real Hugging Face ``datasets.Dataset`` after ``with_transform``, through the KeyedLoader.

The transform draws from torch's global generator (a torchvision v2 random crop + flip + erasing),
so the replay is exact only if the loader seeds each sample; the reference is the first pass of a
loader with another worker count, and a plain ``DataLoader`` over the same items shows that the
transform really draws (two passes differ). Skips without the ``datasets`` package.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may reach a hub
datasets = pytest.importorskip("datasets", reason="Hugging Face datasets is not installed")

from spacedkd_fast.data import KeyedLoader  # noqa: E402

N, B = 20, 6
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def hf_set():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(N, 3, 12, 12), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"image": images.tolist(), "label": [i % 4 for i in range(N)]})
    augment = v2.Compose([v2.RandomResizedCrop(8, antialias=True), v2.RandomHorizontalFlip(),
                          v2.ToDtype(torch.float32, scale=True), v2.RandomErasing(p=0.5)])

    def transform(rows):  # with_transform hands over a dict of columns for the rows asked
        return {"pixel_values": [augment(torch.tensor(img, dtype=torch.uint8)) for img in rows["image"]],
                "label": rows["label"]}

    return ds.with_transform(transform)


def collate(items):
    return (torch.stack([it["pixel_values"] for it in items]),
            torch.tensor([it["label"] for it in items]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_hugging_face_dataset_replays_bit_exactly(num_workers):
    ref = KeyedLoader(hf_set(), batch_size=B, seed=3, collate_fn=collate)
    loader = KeyedLoader(hf_set(), batch_size=B, seed=3, collate_fn=collate,
                         num_workers=num_workers)
    first = list(loader.epoch(0))
    assert len(first) == loader.steps_per_epoch == 4
    assert first[0][1][0].shape == (B, 3, 8, 8)
    labels = torch.cat([y for _, (_, y) in first])
    assert sorted(labels.tolist()) == sorted(i % 4 for i in range(N))  # one pass over the set
    for key, (x, y) in reversed(first):  # replayed in another order, by another loader
        rx, ry = ref.batch(key)
        assert torch.equal(rx, x) and torch.equal(ry, y), f"key {key} differs"


def test_the_transform_really_draws():
    plain = DataLoader(hf_set(), batch_size=N, shuffle=False, collate_fn=collate)
    (a, _), (b, _) = next(iter(plain)), next(iter(plain))
    assert not torch.equal(a, b)
