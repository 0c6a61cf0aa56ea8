"""Real data: torchvision's own ``FashionMNIST`` class over the real files (Debian's
``dataset-fashion-mnist``), through ``torchvision:FashionMNIST`` and the KeyedLoader, replayed
with loader workers, and a short trainer run. Skipped with a message where the files are absent."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.fashion_mnist import fashion_root, needs_fashion

from spacedkd_fast.data import build_data
from spacedkd_fast.data.keyed_loader import KeyedLoader
from spacedkd_fast.data.torchvision_sets import load_torchvision

pytestmark = needs_fashion

# Fashion-MNIST's pixel mean and std over its 60,000 training images, as commonly published
# (0.2860 / 0.3530); ours is measured on 512 of them
PUBLISHED_MEAN, PUBLISHED_STD = 0.2860, 0.3530


@pytest.fixture(scope="module")
def full_root(tmp_path_factory):
    return fashion_root(tmp_path_factory.mktemp("fashion-full"))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """The first 512 training and 128 test images of the real files."""
    return fashion_root(tmp_path_factory.mktemp("fashion-small"), n_train=512, n_test=128)


def test_the_real_class_through_torchvision_name(full_root):
    import torchvision

    data = build_data("torchvision:FashionMNIST", data_dir=str(full_root), batch_size=256, seed=0)
    assert isinstance(data.train, KeyedLoader)
    assert data.train.steps_per_epoch == 235 and data.num_classes == 10  # ceil(60000 / 256)
    assert data.image_size == 28 and data.recipe == "cifar"
    assert "60000 train / 10000 test images, 10 classes, 28x28 px" in data.announcement
    raw = data.train.dataset.dataset
    assert isinstance(raw, torchvision.datasets.FashionMNIST) and raw.train
    # the normalisation: the mean and std of 512 evenly spaced training images, in float64
    picked = raw.data[[i * 60000 // 512 for i in range(512)]].double() / 255
    mean, std = picked.mean().item(), picked.std(unbiased=False).item()
    assert abs(mean - PUBLISHED_MEAN) < 0.02 and abs(std - PUBLISHED_STD) < 0.02
    assert f"{mean:.3f}/{std:.3f}" in data.announcement
    x, y = next(iter(data.test()))
    test_raw = torchvision.datasets.FashionMNIST(str(full_root), train=False)
    assert torch.equal(y, test_raw.targets[:256]) and int(y[0]) == 9  # in order; an ankle boot
    assert x.shape == (256, 3, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # grayscale made RGB
    expected0 = (test_raw.data[0].double() / 255 - mean) / std  # normalised, no augmentation
    assert (x[0, 0].double() - expected0).abs().max() < 1e-5


def test_augmented_real_batches_replay_bit_exactly_with_workers(small_root):
    sets = load_torchvision("FashionMNIST", str(small_root), augment="cifar")
    loader = KeyedLoader(sets.train, batch_size=32, num_workers=2, seed=5)
    first = list(loader.epoch(1))
    assert len(first) == 16
    keys = [k for k, _ in first]
    for key, (x, y) in first[:4] + first[-2:]:  # in the training process
        rx, ry = loader.batch(key)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    ahead = list(loader.batches(keys[::-1]))  # the replay pool, in another order
    for (_, (x, y)), (rx, ry) in zip(first[::-1], ahead):
        assert torch.equal(rx, x) and torch.equal(ry, y)
    # an epoch is every image once: its labels are the split's labels
    labels = torch.cat([y for _, (_, y) in first])
    assert torch.equal(labels.bincount(minlength=10),
                       sets.train.dataset.targets.bincount(minlength=10))
    # the augmentation is really random: another seed draws other pixels for the same key
    other = KeyedLoader(sets.train, batch_size=32, num_workers=0, seed=6).batch(keys[0])[0]
    assert not torch.equal(other, first[0][1][0])


def test_a_short_trainer_run_from_torchvision_fashion_mnist(small_root, tmp_path, capsys):
    from spacedkd_fast.train import cli

    out = tmp_path / "run"
    status = cli.main(["--dataset", "torchvision:FashionMNIST", "--data-dir", str(small_root),
                       "--arch", "resnet18", "--model-kwargs", "downsample_factor=64",
                       "--batch-size", "64", "--epochs", "1", "--interval-rate", "0.5",
                       "--augment", "none", "--device", "cpu", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert ("data set torchvision FashionMNIST" in printed.out
            and "512 train / 128 test images, 10 classes, 28x28 px" in printed.out)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # 8 teacher steps; the student replayed them (each replay checked against its checksum)
    assert row["teacher_steps"] == 8 and row["student_steps"] >= 8
    assert "dataset: torchvision:FashionMNIST" in (out / "config.yaml").read_text()
