"""A user's own Datasets as trainer data: the bad-data checks (one line each, before training and
in the workers), the bundle around a KeyedLoader, ``torchvision:NAME`` resolution and
``module:factory`` specs. Small synthetic sets; the real Fashion-MNIST tests are in
test_torchvision_real.py."""

from __future__ import annotations

import sys

import pytest
import torch

from spacedkd_fast.data import build_data
from spacedkd_fast.data.keyed_loader import KeyedLoader
from spacedkd_fast.data.torchvision_sets import find_class, load_torchvision
from spacedkd_fast.data.user_sets import (
    BadDataError,
    build_user_data,
    factory_sets,
    is_factory,
)


class Squares(torch.utils.data.Dataset):
    """``n`` random 3 x s x s images with labels ``i % classes``; ``bad`` maps an index to a
    replacement item (to plant one bad item where the probe does not look)."""

    def __init__(self, n=40, s=8, classes=4, bad=None, listed=True):
        g = torch.Generator().manual_seed(n * 31 + s)
        self.images = torch.rand(n, 3, s, s, generator=g)
        self.n, self.num = n, classes
        self.bad = bad or {}
        if listed:
            self.targets = [i % classes for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            return self.bad[i]
        return self.images[i] + 0.01 * torch.rand(()), i % self.num  # a random transform


def bundle(train, test=None, **kw):
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 8)
    return build_user_data(train, test if test is not None else Squares(16), **kw)


def test_a_good_set_becomes_a_keyed_bundle_with_exact_replay_and_a_full_test_pass():
    b = bundle(Squares(40), Squares(13), num_classes=4, seed=3)
    assert isinstance(b.train, KeyedLoader)
    assert b.num_classes == 4 and b.image_size == 8 and b.train.steps_per_epoch == 5
    first = list(b.train.epoch(1))
    assert [k for k, _ in first] == list(b.train.keys(1))
    for key, (x, y) in first:
        rx, ry = b.train.batch(key)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    seen = torch.cat([y for _, y in b.test()])
    assert seen.tolist() == [i % 4 for i in range(13)]  # every test item once, in order
    assert "40 train / 13 test images, 4 classes" in b.announcement


def test_the_class_count_comes_from_classes_or_the_listed_labels():
    s = Squares(40, classes=5)
    assert bundle(s).num_classes == 5  # 1 + the largest listed label
    s.classes = [f"c{i}" for i in range(7)]
    assert bundle(s).num_classes == 7
    with pytest.raises(BadDataError, match="pass num_classes="):
        bundle(Squares(40, listed=False))


def test_an_empty_set_is_one_line():
    with pytest.raises(BadDataError, match=r"training set is empty \(len 0\)"):
        bundle(Squares(0), num_classes=3)
    with pytest.raises(BadDataError, match=r"test set is empty"):
        bundle(Squares(8), Squares(0), num_classes=4)


def test_an_item_that_is_not_a_pair_is_named():
    s = Squares(40, bad={0: torch.zeros(3, 8, 8)})
    with pytest.raises(BadDataError, match=r"item 0: a Dataset item must be an \(image, label\) "
                                           r"pair, got Tensor"):
        bundle(s)
    s = Squares(40, bad={0: (torch.zeros(3, 8, 8), 1, "extra")})
    with pytest.raises(BadDataError, match="got a 3-tuple"):
        bundle(s)


def test_labels_outside_the_classes_are_named():
    listed = Squares(40)
    listed.targets[17] = 9  # the listed labels are all checked, without loading an image
    with pytest.raises(BadDataError, match=r"item 17 has label 9, outside \[0, 4\)"):
        bundle(listed, num_classes=4)
    probed = Squares(40, listed=False, bad={0: (torch.zeros(3, 8, 8), -1)})
    with pytest.raises(BadDataError, match=r"item 0: label -1 is outside \[0, 4\)"):
        bundle(probed, num_classes=4)
    floats = Squares(40, listed=False, bad={0: (torch.zeros(3, 8, 8), 1.5)})
    with pytest.raises(BadDataError, match="not an integer class index"):
        bundle(floats, num_classes=4)


def test_unequal_sizes_without_a_collate_are_named_and_a_collate_makes_them_fine():
    s = Squares(40, bad={5: (torch.zeros(3, 10, 10), 1)})  # item 5 is probed (40 // 8 apart)
    with pytest.raises(BadDataError, match=r"item 5: image of size 3x10x10, but training set "
                                           r"item 0 is 3x8x8"):
        bundle(s, num_classes=4)

    def crop_collate(items):
        return (torch.stack([x[:, :8, :8] for x, _ in items]),
                torch.tensor([y for _, y in items]))

    b = bundle(s, num_classes=4, collate_fn=crop_collate)
    assert sum(len(y) for _, (_, y) in b.train.epoch(0)) == 40


def test_images_the_models_cannot_take_say_which_transform_fixes_them():
    from PIL import Image

    pil = Squares(40, bad={0: (Image.new("RGB", (8, 8)), 0)})
    with pytest.raises(BadDataError, match=r"not a tensor; .*v2.ToImage\(\)"):
        bundle(pil, num_classes=4)
    gray = Squares(40, bad={i: (torch.zeros(1, 8, 8), 0) for i in range(40)})
    with pytest.raises(BadDataError, match=r"images are 1x8x8; .*v2.RGB\(\)"):
        bundle(gray, num_classes=4)
    uint8 = Squares(40, bad={i: (torch.zeros(3, 8, 8, dtype=torch.uint8), 0) for i in range(40)})
    with pytest.raises(BadDataError, match="torch.uint8"):
        bundle(uint8, num_classes=4)


def test_a_bad_item_met_by_a_worker_mid_epoch_is_still_one_line():
    # item 3 is not probed before training; the collate check in the worker finds it
    s = Squares(40, listed=False, bad={3: (torch.zeros(3, 8, 8), 11)})
    b = bundle(s, num_classes=4, num_workers=1)
    with pytest.raises(BadDataError) as info:
        for _ in b.train.epoch(0):
            pass
    text = str(info.value)
    assert "\n" not in text
    assert "label 11 is outside [0, 4)" in text
    assert getattr(info.value, "bad_input", False)  # the trainer's mark for exit status 2


def test_module_factory_specs():
    assert is_factory("mypkg.data:make_sets")
    assert not is_factory("torchvision:FashionMNIST") and not is_factory("folder:/x/y")
    assert not is_factory("cifar100") and not is_factory("from-python:Squares")
    mod = type(sys)("user_sets_factory_probe")
    mod.make = lambda image_size=None: (Squares(24), Squares(8), 4 if image_size is None else 0)
    mod.two = lambda: (Squares(24), Squares(8))
    mod.one = lambda: Squares(24)
    sys.modules[mod.__name__] = mod
    try:
        tr, te, n = factory_sets(f"{mod.__name__}:make", data_dir="x", image_size=None, seed=0)
        assert len(tr) == 24 and len(te) == 8 and n == 4
        assert factory_sets(f"{mod.__name__}:two", seed=0)[2] is None
        with pytest.raises(BadDataError, match=r"must return \(train_set, test_set\)"):
            factory_sets(f"{mod.__name__}:one")
        with pytest.raises(BadDataError, match="has no callable 'nope'"):
            factory_sets(f"{mod.__name__}:nope")
        b = build_data(f"{mod.__name__}:two", batch_size=8, seed=0)
        assert isinstance(b.train, KeyedLoader) and b.num_classes == 4
    finally:
        del sys.modules[mod.__name__]
    with pytest.raises(BadDataError, match="cannot import no_such_module_here"):
        factory_sets("no_such_module_here:make")


def test_torchvision_names_resolve_case_insensitively_and_missing_files_name_the_folder(tmp_path):
    import torchvision.datasets as tvd

    assert find_class("fashionmnist") is tvd.FashionMNIST and find_class("SVHN") is tvd.SVHN
    with pytest.raises(ValueError, match="no data set class 'NoSuchSet'"):
        find_class("NoSuchSet")
    with pytest.raises(FileNotFoundError, match=rf"FashionMNIST: its files are not under {tmp_path}"):
        load_torchvision("FashionMNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"from {tmp_path}/FashionMNIST/raw/ \(gunzip"):
        load_torchvision("FashionMNIST", str(tmp_path))  # the MNIST family's layout is named
    with pytest.raises(FileNotFoundError, match=rf"SVHN: its files are not under {tmp_path}"):
        load_torchvision("SVHN", str(tmp_path))  # a split= class
    with pytest.raises(ValueError, match="FakeData has no train/test split"):
        load_torchvision("FakeData", str(tmp_path))


def test_the_probe_leaves_the_callers_random_state_alone():
    import random

    import numpy as np

    class Draws(Squares):
        def __getitem__(self, i):  # a transform drawing from all three global generators
            x, y = super().__getitem__(i)
            return x + torch.rand(()) + float(np.random.rand()) + random.random(), y

    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    bundle(Draws(40), Draws(16), num_classes=4)
    after = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    assert torch.equal(after[0], torch.rand(3))
    assert np.array_equal(after[1], np.random.rand(3))
    assert after[2] == [random.random() for _ in range(3)]


def test_an_image_size_the_images_do_not_have_is_named():
    with pytest.raises(BadDataError, match=r"images are 8x8 px but the image size asked for is 16"):
        bundle(Squares(40), num_classes=4, image_size=16)
    assert bundle(Squares(40), num_classes=4, image_size=8).image_size == 8
