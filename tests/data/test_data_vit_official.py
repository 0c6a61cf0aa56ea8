"""The 'vit-official' recipe against timm's own transforms (timm 1.0.31 + Pillow, as the official
ViT code runs them).

For a key, timm's own code is driven with *our* draws: its ``get_params`` / ``_erase`` read our
uniforms through a stand-in for the ``random`` module, and timm's RandAugment op functions get
our op choices and values. Stated tolerances: the random-resized crop, the flip, every geometric
policy op and the test resize are bit-identical to PIL; photometric policy ops keep the
tolerances of tests/data/test_data_ops.py (enhance ops within 2 grey levels, AutoContrast 1),
which thresholds (Solarize, Posterize) can widen on a few pixels; normalisation within 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_fakes import write_cifar100

from spacedkd_fast.data import build_data, pilops
from spacedkd_fast.data.augment import Augmenter, erase_boxes
from spacedkd_fast.data.datasets import ArrayData
from spacedkd_fast.data.policies import OPS
from spacedkd_fast.data.sources import TensorSource

timm = pytest.importorskip("timm")
from timm.data import auto_augment as timm_aa  # noqa: E402
from timm.data import create_transform  # noqa: E402
from timm.data import random_erasing as timm_re  # noqa: E402
from timm.data import transforms as timm_tf  # noqa: E402

SIZE = 224  # the official size: the recipe's parameters are checked at it
OUT = 96  # pixel comparisons run at a smaller output size (same code paths, 5x less work)


@pytest.fixture(scope="module")
def official():
    """timm's train transform exactly as the official code builds it (three parts)."""
    return create_transform(input_size=(SIZE, SIZE), is_training=True,
                            auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4, re_prob=0.25,
                            re_mode="pixel", re_count=1, interpolation="bicubic", separate=True)


def cifar_like(n=24, seed=0) -> ArrayData:
    """32 px images with smooth regions and edges (upscaled noise), like natural images."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, 8, 8), generator=g).float()
    big = torch.nn.functional.interpolate(small, size=(32, 32), mode="bicubic", align_corners=False)
    images = big.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return ArrayData(images, np.arange(n, dtype=np.int64) % 10, [str(i) for i in range(10)], "fake")


class Draws:
    """Stands in for the ``random`` module inside timm: ``uniform`` and ``randint`` return the
    values our uniforms ``u [10, 4]`` give (attempt j reads row j: area, log-ratio, top, left)."""

    def __init__(self, u: torch.Tensor, first: float = 0.0):
        self.u, self.calls, self.ints, self.first = u.double(), 0, 0, first

    def random(self):  # RandomErasing's "apply?" draw
        return self.first

    def uniform(self, a, b):
        j, k = divmod(self.calls, 2)
        self.calls += 1
        self.ints = 0
        return a + (b - a) * float(self.u[j, k])

    def randint(self, a, b):
        j = (self.calls - 1) // 2
        v = a + math.floor(float(self.u[j, 2 + self.ints]) * (b - a + 1))
        self.ints += 1
        return v


def timm_box(monkeypatch, u, height, width):
    monkeypatch.setattr(timm_tf, "random", Draws(u))
    img = Image.new("RGB", (width, height))
    return timm_tf.RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))


def timm_op(name: str, img: Image.Image, value: float, kwargs: dict) -> Image.Image:
    """timm's op function for our op and value (arguments as timm's level functions give them)."""
    v = float(value)
    table = {
        "AutoContrast": lambda: timm_aa.auto_contrast(img, **kwargs),
        "Equalize": lambda: timm_aa.equalize(img, **kwargs),
        "Invert": lambda: timm_aa.invert(img, **kwargs),
        "Rotate": lambda: timm_aa.rotate(img, v, **kwargs),
        # 0 bits (magnitude 10): Pillow 13 refuses it; older Pillow, as in the official runs,
        # returned a black image
        "Posterize": lambda: (timm_aa.posterize(img, int(v), **kwargs) if int(v) > 0
                              else Image.new("RGB", img.size)),
        "Solarize": lambda: timm_aa.solarize(img, int(v), **kwargs),
        "SolarizeAdd": lambda: timm_aa.solarize_add(img, int(v), **kwargs),
        "Color": lambda: timm_aa.color(img, v, **kwargs),
        "Contrast": lambda: timm_aa.contrast(img, v, **kwargs),
        "Brightness": lambda: timm_aa.brightness(img, v, **kwargs),
        "Sharpness": lambda: timm_aa.sharpness(img, v, **kwargs),
        "ShearX": lambda: timm_aa.shear_x(img, v, **kwargs),
        "ShearY": lambda: timm_aa.shear_y(img, v, **kwargs),
        "TranslateX": lambda: timm_aa.translate_x_rel(img, v, **kwargs),
        "TranslateY": lambda: timm_aa.translate_y_rel(img, v, **kwargs),
    }
    return table[name]()


def as_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy())


def as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


# ------------------------------------------------------------------------------- PIL ops
@pytest.mark.parametrize("kind, filt", [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
def test_resized_crop_is_pil_crop_then_resize(kind, filt):
    rng = np.random.default_rng(3)
    for src in (32, 64, 90):
        img = rng.integers(0, 256, (src, src + 7, 3), dtype=np.uint8)
        x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
        for _ in range(3):  # upscaling to 224 (the official use) and one axis shrinking
            h, w = int(rng.integers(1, src + 1)), int(rng.integers(1, src + 8))
            t, l_ = int(rng.integers(0, src - h + 1)), int(rng.integers(0, src + 7 - w + 1))
            for out in ((SIZE, SIZE), (max(1, h - 3), w + 5), (h + 4, max(1, w - 2))):
                ref = np.asarray(Image.fromarray(img).crop((l_, t, l_ + w, t + h))
                                 .resize((out[1], out[0]), filt))
                got = pilops.resized_crop(x, *(torch.tensor([v]) for v in (t, l_, h, w)), out, kind)
                assert np.array_equal(got[0].permute(1, 2, 0).numpy(), ref), (src, t, l_, h, w, out)


def test_resized_crop_when_both_axes_shrink_is_within_tolerance():
    """Pillow 13 sometimes runs the vertical pass first then; we do not reproduce that rule."""
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (120, 110, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
    ref = np.asarray(Image.fromarray(img).resize((40, 24), Image.BICUBIC)).astype(int)
    got = pilops.resized_crop(x, *(torch.tensor([v]) for v in (0, 0, 120, 110)), (24, 40), "bicubic")
    d = np.abs(got[0].permute(1, 2, 0).numpy().astype(int) - ref)
    assert d.max() <= 32 and d.mean() < 1.0


def test_affine_bicubic_is_pil_transform_with_fill():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (OUT, OUT, 3), dtype=np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
    fill = (124, 116, 104)
    datas = [(1, 0.27, 0, 0, 1, 0), (1, 0, 0, -0.21, 1, 0), (1, 0, 17.3, 0, 1, 0),
             (1, 0, 0, 0, 1, -30.64), pilops.rotation_data(-23.7, OUT, OUT)]
    for data in datas:
        ref = np.asarray(Image.fromarray(img).transform((OUT, OUT), Image.AFFINE, data,
                                                        Image.BICUBIC, fillcolor=fill))
        got = pilops.affine_bicubic(x, torch.tensor([data], dtype=torch.float64), fill)
        assert np.array_equal(got[0].permute(1, 2, 0).numpy(), ref), data
    ref = np.asarray(Image.fromarray(img).rotate(12.5, resample=Image.BICUBIC, fillcolor=fill))
    got = pilops.affine_bicubic(x, torch.tensor([pilops.rotation_data(12.5, OUT, OUT)],
                                             dtype=torch.float64), fill)
    assert np.array_equal(got[0].permute(1, 2, 0).numpy(), ref)


# ------------------------------------------------------------------------ the pipeline
def test_recipe_is_what_timm_builds(official):
    aug = Augmenter("vit-official", SIZE)
    ra = official[1].transforms[0]
    norm = official[2].transforms[1]
    erase = official[2].transforms[2]
    r = aug.recipe
    assert (r.rrc_scale, r.rrc_ratio) == (official[0].transforms[0].scale, official[0].transforms[0].ratio)
    assert ra.num_layers == r.randaugment_ops == 2
    assert {op.magnitude for op in ra.ops} == {r.randaugment_magnitude}
    assert {op.magnitude_std for op in ra.ops} == {r.randaugment_std}
    assert {op.prob for op in ra.ops} == {0.5}
    assert tuple(ra.ops[0].kwargs["fillcolor"]) == tuple(r.policy_fill)
    assert torch.allclose(torch.tensor(aug.mean), norm.mean) and torch.allclose(torch.tensor(aug.std), norm.std)
    assert (erase.probability, erase.mode) == (r.erasing_p, "pixel") and r.drop_last


@pytest.mark.parametrize("key", [1, 2])
def test_pipeline_equals_timm_ops_with_our_parameters(official, monkeypatch, key):
    data = cifar_like()
    aug = Augmenter("vit-official", OUT, seed=11)
    src = TensorSource(data, aug, batch_size=12, seed=11)
    idx, p = src.params(key)
    images = src.images[idx]
    ours = aug.photometric(aug.geometric(images, p), p)  # uint8 [12, 3, OUT, OUT]
    kwargs = dict(official[1].transforms[0].ops[0].kwargs)
    top, left, h, w = aug.boxes(p, torch.full((12,), 32), torch.full((12,), 32))
    exact_rows = 0
    for b in range(12):
        # the box: timm's own get_params fed with our uniforms
        assert timm_box(monkeypatch, p["rrc"][b], 32, 32) == (int(top[b]), int(left[b]), int(h[b]), int(w[b]))
        img = as_pil(images[b])
        img = timm_tf.F.resized_crop(img, int(top[b]), int(left[b]), int(h[b]), int(w[b]),
                                     [OUT, OUT], timm_tf.str_to_interp_mode("bicubic"))
        if bool(p["flip"][b]):
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        applied = []
        for op, value, apply in p["policy"]:
            if bool(apply[b]):
                applied.append(OPS[int(op[b])])
                img = timm_op(OPS[int(op[b])], img, value[b], kwargs)
        ref = as_tensor(img)
        d = (ours[b].int() - ref.int()).abs()
        photometric = {"Color", "Contrast", "Brightness", "Sharpness", "AutoContrast"}
        if not photometric & set(applied):
            assert int(d.max()) == 0, (b, applied)  # crop, flip, geometric & lookup ops: exact
            exact_rows += 1
        else:
            # enhance ops: PIL truncates its 8-bit blend and uses an integer mean (Contrast),
            # we round: within 2 grey levels per op; a later threshold op may move a few pixels
            assert float((d <= 2 * len(applied)).float().mean()) > 0.99, (b, applied)
            assert float(d.float().mean()) < 1.5, (b, applied)
    assert exact_rows >= 1


def test_normalise_and_erasing_follow_timm(official, monkeypatch):
    data = cifar_like()
    aug = Augmenter("vit-official", OUT, seed=2)
    src = TensorSource(data, aug, batch_size=12, seed=2)
    for key in (1, 2):
        _, p = src.params(key)
        # finish() (normalise + erase) does not look at how the pixels were made: random ones
        u8 = torch.randint(0, 256, (12, 3, OUT, OUT), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(key))
        x = aug.finish(u8, p)
        to_tensor, norm, erase = official[2].transforms
        monkeypatch.setattr(timm_re, "_get_pixels", lambda *a, **k: torch.tensor(float("nan")))
        _, _, _, _, found = erase_boxes(p["erase"], OUT, OUT)
        for b in range(12):
            ref = norm(to_tensor(as_pil(u8[b])))
            monkeypatch.setattr(timm_re, "random", Draws(p["erase"][b], 0.0 if p["erase_apply"][b] else 1.0))
            marked = erase(ref.clone())
            box = marked.isnan()
            keep = ~box
            assert torch.allclose(x[b][keep], ref[keep], atol=1e-5)
            assert bool(box.any()) == bool(p["erase_apply"][b] and found[b])
            if bool(box.any()):  # per-pixel standard normal noise inside timm's box
                noise = x[b][box]
                assert not torch.allclose(noise, ref[box], atol=1e-3)
                assert abs(float(noise.mean())) < 0.2 and abs(float(noise.std()) - 1) < 0.2


def test_test_resize_is_torchvision_resize_bilinear():
    from torchvision import transforms as T

    data = cifar_like(n=4)
    aug = Augmenter("vit-official", SIZE)
    x = aug.test_transform(torch.from_numpy(data.images).permute(0, 3, 1, 2))
    tf = T.Compose([T.Resize((SIZE, SIZE)), T.ToTensor(), T.Normalize(aug.mean, aug.std)])
    ref = torch.stack([tf(Image.fromarray(im)) for im in data.images])
    assert torch.allclose(x, ref, atol=1e-5)


def test_build_data_drops_the_last_batch_and_uses_imagenet_stats(tmp_path):
    write_cifar100(tmp_path, n_train=40, n_test=4)
    b = build_data("cifar100", data_dir=str(tmp_path), recipe="vit-official", batch_size=16,
                   image_size=48)
    assert b.train.steps_per_epoch == 2 and "last partial batch dropped" in b.announcement
    assert b.train.augmenter.mean == (0.485, 0.456, 0.406)
    assert build_data("cifar100", data_dir=str(tmp_path), recipe="vit-official", batch_size=16,
                      image_size=48, drop_last=False).train.steps_per_epoch == 3
    assert build_data("cifar100", data_dir=str(tmp_path), batch_size=16).train.steps_per_epoch == 3
    key, (x, y) = next(iter(b.train.epoch(0)))
    assert x.shape == (16, 3, 48, 48) and torch.equal(x, b.train.batch(key)[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_resident_batches_equal_the_cpu_ones():
    """Integer-valued float64 sums and elementwise float64 ops: the same pixels on the GPU."""
    data = cifar_like()
    cpu = TensorSource(data, Augmenter("vit-official", OUT, seed=5), batch_size=12, seed=5)
    gpu = TensorSource(data, Augmenter("vit-official", OUT, seed=5), batch_size=12, seed=5,
                       device="cuda")
    for key in (1, 2):
        idx, p = cpu.params(key)
        a = cpu.augmenter
        want = a.photometric(a.geometric(cpu.images[idx], p), p)
        got = a.photometric(a.geometric(gpu.images[idx.cuda()], p), p)
        assert torch.equal(got.cpu(), want)
        x, y = gpu.batch(key)
        assert x.is_cuda and torch.equal(x, gpu.batch(key)[0])
