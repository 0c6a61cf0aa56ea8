"""The ``torchvision`` data backend: auto's CPU choice for image folders and Tiny-ImageNet, the
recipes as torchvision / timm transforms in a KeyedLoader, bit-exact replay with workers.

References are built here, not taken from the backend: each sample's pixels are recomputed by a
torchvision / timm composition written in the test, run on the file decoded by PIL, with the
three global generators seeded as the keyed loader's contract says (``sample_seeds``); the test
transform by PIL resizes with the resize-then-centre-crop arithmetic written out, normalised in
float64."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_fakes import save_jpeg, write_tiny
from torch.utils.data import default_collate

from spacedkd_fast.data import KeyedLoader, build_data
from spacedkd_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD, get_recipe
from spacedkd_fast.data.build import _choose_backend
from spacedkd_fast.data.keyed import epoch_permutation, sample_seeds
from spacedkd_fast.data.sources import FileSource

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

SIZES = [(40, 30), (24, 48), (33, 33), (64, 20), (50, 50), (20, 36)]
S, B = 16, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``train/<class>/`` (12 JPEGs and 3 PNGs of mixed sizes) and ``val/<class>/`` (4 JPEGs)."""
    root = tmp_path_factory.mktemp("folder")
    for k in range(12):
        save_jpeg(root / "train" / f"c{k % 3}" / f"{k}.JPEG", size=SIZES[k % 6], seed=k)
    for k in range(3):
        rng = np.random.default_rng(70 + k)
        Image.fromarray(rng.integers(0, 256, (26, 30, 3), dtype=np.uint8)).save(
            root / "train" / f"c{k}" / f"p{k}.png")
    for k in range(4):
        save_jpeg(root / "val" / f"c{k % 3}" / f"{k}.JPEG", size=SIZES[k], seed=50 + k)
    return root


def rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# ------------------------------------------------------------------------------- the choice
@pytest.mark.parametrize("device, kind, recipe, want", [
    ("cpu", "folder", "imagenet", "torchvision"),
    ("cpu", "imagenet", "vit", "torchvision"),
    ("cpu", "imagenet", "vit-official", "torchvision"),
    ("cpu", "tiny-imagenet", "tiny", "torchvision"),
    ("cpu", "folder", "cifar-selfkd", "torch-cpu"),  # Cutout: no torchvision form
    ("cpu", "cifar100", "cifar", "torch-cpu"),  # in-memory sets keep the batched backend
    ("cpu", "digits", "none", "torch-cpu"),
    ("cuda", "cifar100", "cifar", "gpu-resident"),
    ("cuda", "tiny-imagenet", "tiny", "gpu-resident"),  # decoded into memory
    ("cuda", "folder", "imagenet", "torchvision"),  # DALI absent (monkeypatched below)
    ("cuda", "folder", "cifar-selfkd", "torch-cpu"),
])
def test_auto_picks_torchvision_for_file_sets_on_a_cpu(monkeypatch, device, kind, recipe, want):
    monkeypatch.setattr("spacedkd_fast.data.dali.dali_available", lambda: False)
    files = kind in ("folder", "imagenet")
    chosen, why = _choose_backend("auto", torch.device(device), files, False, kind,
                                  get_recipe(recipe))
    assert chosen == want
    if recipe == "cifar-selfkd":
        assert "Cutout" in why
    if device == "cuda" and kind == "folder":
        assert "DALI not installed" in why


@pytest.mark.parametrize("recipe, want", [("imagenet", "dali"), ("vit", "dali"),
                                          ("vit-official", "torchvision")])
def test_auto_on_a_cuda_folder_with_dali(monkeypatch, recipe, want):
    """DALI takes folders on CUDA except recipes that resample as PIL does (vit-official)."""
    monkeypatch.setattr("spacedkd_fast.data.dali.dali_available", lambda: True)
    rec = get_recipe(recipe)
    pil = "pil" in rec.resample or "pil" in rec.test_resample
    chosen, why = _choose_backend("auto", torch.device("cuda"), True, pil, "folder", rec)
    assert chosen == want
    if want == "torchvision":
        assert "resamples as PIL does" in why


def test_forced_backends_on_a_folder(folder):
    assert isinstance(build_data(f"folder:{folder}", batch_size=B, image_size=S,
                                 backend="cpu").train, FileSource)
    b = build_data(f"folder:{folder}", batch_size=B, image_size=S, backend="torchvision")
    assert b.backend == "torchvision" and isinstance(b.train, KeyedLoader)
    with pytest.raises(ValueError, match="Cutout.*--data-backend cpu"):
        build_data(f"folder:{folder}", batch_size=B, image_size=S, backend="torchvision",
                   recipe="cifar-selfkd")


def test_auto_on_folders_and_tiny_imagenet_and_not_on_digits(folder, tmp_path):
    b = build_data(f"folder:{folder}", batch_size=B, image_size=S, recipe="vit")
    assert b.backend == "torchvision" and isinstance(b.train, KeyedLoader)
    assert "backend torchvision" in b.announcement and "recipe 'vit'" in b.announcement
    assert b.num_classes == 3 and b.image_size == S and b.train.num_samples == 15
    x, y = b.train.batch(1)
    assert x.shape == (B, 3, S, S) and x.dtype == torch.float32 and y.dtype == torch.int64
    test = list(b.test())
    assert sum(len(t[1]) for t in test) == 4 and test[0][0].shape[1:] == (3, S, S)
    write_tiny(tmp_path)
    t = build_data("tiny-imagenet", data_dir=str(tmp_path), batch_size=3)
    assert t.backend == "torchvision" and t.image_size == 64 and t.train.batch(1)[0].shape == (3, 3, 64, 64)
    assert build_data("digits", batch_size=64).backend == "torch-cpu"


# -------------------------------------------------------------------- replay with workers
@pytest.mark.parametrize("recipe", ["vit", "vit-official"])
def test_batches_replay_bit_exactly_with_any_worker_count(folder, recipe):
    b = build_data(f"folder:{folder}", batch_size=B, image_size=S, recipe=recipe, seed=5)
    first = list(b.train.epoch(1))  # the default workers (cores - 1)
    assert len(first) == b.train.steps_per_epoch
    again = dict(zip(b.train.keys(1), b.train.batches(b.train.keys(1))))
    for workers in (0, 2):
        other = KeyedLoader(b.train.dataset, batch_size=B, shuffle=True, drop_last=b.train.drop_last,
                            num_workers=workers, collate_fn=b.train.collate_fn, seed=5)
        second = list(other.epoch(1))  # run to its end: the workers stop with the epoch
        assert len(second) == len(first)
        for (key, (x, y)), (key2, (x2, y2)) in zip(first, second):
            assert key == key2 and torch.equal(x, x2) and torch.equal(y, y2), (workers, key)
    for key, (x, y) in first:
        rx, ry = b.train.batch(key)
        assert torch.equal(rx, x) and torch.equal(ry, y)
        assert torch.equal(again[key][0], x)
    # the draws are real: two epochs differ, and so do two samples of one image
    assert not torch.equal(first[0][1][0], list(b.train.epoch(2))[0][1][0])


# ------------------------------------------------------------ against compositions built here
def reference_batch(paths, seed, epoch, i, transform):
    """Rows of batch ``i`` of ``epoch``: each file through ``transform`` after seeding torch,
    numpy and ``random`` with ``sample_seeds(seed, 0, key, position)``."""
    n = len(paths)
    steps = -(-n // B)
    key = epoch * steps + i + 1
    order = epoch_permutation(seed, epoch, n, 0)[i * B:(i + 1) * B].tolist()
    rows = []
    for pos, idx in enumerate(order):
        ts, ns, ps = sample_seeds(seed, 0, key, pos)
        torch.manual_seed(ts)
        np.random.seed(ns)
        random.seed(ps)
        rows.append(transform(rgb(paths[idx])))
    return key, torch.stack(rows)


def vit_reference():
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(S, antialias=True), v2.RandomHorizontalFlip(),
        v2.RandAugment(num_ops=2, magnitude=9, fill=[128, 128, 128]), v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.RandomErasing(p=0.25, value="random")])


def vit_official_reference():
    from timm.data import create_transform

    return create_transform(S, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                            re_mode="pixel", interpolation="bicubic")


@pytest.mark.parametrize("recipe, make", [("vit", vit_reference),
                                          ("vit-official", vit_official_reference)])
def test_training_pixels_are_the_recipe_built_from_torchvision_and_timm(folder, recipe, make):
    pytest.importorskip("timm")
    b = build_data(f"folder:{folder}", batch_size=B, image_size=S, recipe=recipe, seed=3,
                   drop_last=False)
    paths = b.train.dataset.data.paths
    transform = make()
    with torch.random.fork_rng(devices=[]):
        state = (np.random.get_state(), random.getstate())
        for epoch, i in [(0, 0), (1, 2), (2, 3)]:
            key, want = reference_batch(paths, 3, epoch, i, transform)
            x, _ = b.train.batch(key)
            assert torch.equal(x, want), (epoch, i)
        np.random.set_state(state[0])
        random.setstate(state[1])


def test_vit_official_posterize_at_magnitude_10_gives_black_not_an_error():
    """timm asks for 0 bits at magnitude 10 (reached by the mstd0.5 magnitude); Pillow 13 refuses
    them. The official runs' Pillow gave a black image: so must a worker, not stop the epoch."""
    pytest.importorskip("timm")
    import copy

    from spacedkd_fast.data.torchvision_recipes import train_transform

    transform = train_transform(get_recipe("vit-official"), S, IMAGENET_MEAN, IMAGENET_STD)
    ops = [op for step in transform.transforms for op in getattr(step, "ops", [])
           if op.name.startswith("Posterize")]
    assert ops
    op = copy.copy(ops[0])
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.fromarray(np.full((5, 7, 3), 201, dtype=np.uint8))
    out = op(image)
    assert out.size == (7, 5) and out.mode == "RGB" and not np.asarray(out).any()
    op.magnitude = 5  # 2 bits kept: 201 = 0b11001001 -> 0b11000000
    assert (np.asarray(op(image)) == 192).all()


def test_imagenet_test_transform_is_resize_then_centre_crop_normalised(folder):
    b = build_data(f"folder:{folder}", batch_size=B, image_size=S, recipe="imagenet")
    x = torch.cat([t[0] for t in b.test()]).double()
    short = round(S / 0.875)  # imagenet's resize 256 / crop 224, at S px
    for n, path in enumerate(sorted((folder / "val").glob("*/*.JPEG"))):
        im = rgb(path)
        w, h = im.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        im = im.resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - S) / 2)), int(round((size[1] - S) / 2))
        pixels = np.asarray(im.crop((left, top, left + S, top + S)), dtype=np.float64) / 255
        want = (torch.from_numpy(pixels).permute(2, 0, 1)
                - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)) \
            / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
        torch.testing.assert_close(x[n], want, atol=1e-5, rtol=0)


def test_collate_is_torch_default_on_the_checked_items(folder):
    b = build_data(f"folder:{folder}", batch_size=B, image_size=S, recipe="none")
    items = [b.train.dataset[i] for i in range(3)]
    x, y = b.train.collate_fn(items)
    wx, wy = default_collate(items)
    assert torch.equal(x, wx) and torch.equal(y, wy)
    assert y.tolist() == [0, 0, 0]  # class c0's files come first (classes sorted by name)


# ------------------------------------------------------------------------------- the trainer
def test_trainer_defaults_to_it_on_a_folder_replays_and_resumes(folder, tmp_path, capsys):
    import json

    from spacedkd_fast.train import cli

    out = tmp_path / "run"
    flags = ["--arch", "resnet18", "--model-kwargs", "downsample_factor=64", "--batch-size", "4",
             "--device", "cpu", "--interval-rate", "0.5", "--augment", "vit", "--image-size",
             str(S), "--no-progress"]
    status = cli.main(["--dataset", f"folder:{folder}", "--out", str(out), "--epochs", "1", *flags])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    assert "backend torchvision (image files on a CPU device" in printed.out
    assert "data_backend: auto" in (out / "config.yaml").read_text()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the student replayed: every replayed batch is checked against the checksum of the batch
    # the teacher saw, so a replay that gave other pixels would have stopped the run
    assert rows[-1]["teacher_steps"] == 4 and rows[-1]["student_steps"] > 0
    assert cli.main(["--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    assert "backend torchvision" in capsys.readouterr().out  # auto resolves as it did
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["teacher_steps"] == 8
