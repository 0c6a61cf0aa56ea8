"""Batched image ops and keyed parameters against independent references (PIL, naive loops,
torch.nn.functional on single crops, torchvision's rules re-derived in plain Python)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from spacedkd_fast.data import imageops
from spacedkd_fast.data.augment import RECIPES, Augmenter, erase_boxes, rrc_boxes, select_rows
from spacedkd_fast.data.keyed import epoch_permutation, keyed_seed
from spacedkd_fast.data.policies import (
    OP_ID,
    _geometric_inverse,
    apply_rounds,
    draw_autoaugment,
    draw_randaugment,
)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    # Smooth-ish content plus noise, so histograms and edges are not degenerate.
    base = torch.randint(0, 256, (6, 3, 8, 8), generator=g).float()
    up = F.interpolate(base, size=(24, 24), mode="bilinear", align_corners=False)
    noise = torch.randint(-20, 21, up.shape, generator=g)
    return (up + noise).clamp(0, 255).to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def worst(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.int() - b.int()).abs()
    i = int(d.flatten().argmax())
    return f"max |diff| {int(d.max())} at flat index {i}, {int((d > 0).sum())} of {d.numel()} differ"


# ---------------------------------------------------------------------------------- geometric
def test_crop_flip_matches_naive_padded_crop(images):
    B, C, H, W = images.shape
    top = torch.tensor([-4, 0, 4, -2, 3, -4])
    left = torch.tensor([4, -4, 0, 1, -3, -4])
    flip = torch.tensor([True, False, True, False, True, True])
    out = imageops.crop_flip(images, top, left, (H, W), flip, fill=128)
    padded = torch.full((B, C, H + 8, W + 8), 128, dtype=torch.uint8)
    padded[:, :, 4:-4, 4:-4] = images
    for b in range(B):
        ref = padded[b, :, top[b] + 4:top[b] + 4 + H, left[b] + 4:left[b] + 4 + W]
        if flip[b]:
            ref = ref.flip(-1)
        assert torch.equal(out[b], ref), f"sample {b}: {worst(out[b], ref)}"


@pytest.mark.parametrize("name,values", [
    ("ShearX", [0.13, -0.27, 0.07, 0.29, -0.11, 0.0]),
    ("ShearY", [0.13, -0.27, 0.07, 0.29, -0.11, 0.0]),
    ("TranslateX", [0.1, -0.3, 0.23, 0.05, -0.45, 0.0]),
    ("TranslateY", [0.1, -0.3, 0.23, 0.05, -0.45, 0.0]),
])
def test_affine_ops_match_pil_transform(images, name, values):
    v = torch.tensor(values, dtype=torch.float64)
    inv = _geometric_inverse(name, v, 24, 24)
    out = imageops.affine_nearest(images, inv, fill=128)
    for b in range(images.shape[0]):
        coeffs = inv[b].flatten().tolist()
        ref = from_pil(to_pil(images[b]).transform((24, 24), Image.AFFINE, coeffs, resample=Image.NEAREST,
                                                   fillcolor=(128, 128, 128)))
        assert torch.equal(out[b], ref), f"{name} {values[b]}: {worst(out[b], ref)}"


def test_rotation_matches_pil_rotate(images):
    angles = torch.tensor([10.0, -13.7, 15.0, 3.3, -7.9, 0.0])
    out = imageops.rotate_nearest(images, angles, fill=0)
    for b in range(images.shape[0]):
        ref = from_pil(to_pil(images[b]).rotate(float(angles[b]), resample=Image.NEAREST))
        # PIL accumulates coordinates incrementally; ties at exact pixel edges may round apart.
        frac = (out[b] != ref).float().mean().item()
        assert frac <= 0.01, f"angle {angles[b]}: {worst(out[b], ref)}"


@pytest.mark.parametrize("scale", [1, 5])  # 24 px sources take the matmul path, 120 px the gathers
def test_resized_crop_matches_interpolate_on_the_crop(images, scale):
    B = images.shape[0]
    x = images if scale == 1 else images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    assert (x.shape[2] * x.shape[3] <= imageops.MATMUL_MAX_PIXELS) == (scale == 1)
    top = torch.tensor([0, 3, 5, 0, 10, 2]) * scale
    left = torch.tensor([0, 1, 7, 12, 2, 0]) * scale
    h = torch.tensor([24, 10, 17, 12, 14, 5]) * scale
    w = torch.tensor([24, 19, 9, 12, 22, 7]) * scale
    flip = torch.tensor([False, True, False, True, True, False])
    for size in [(16, 16), (40, 30)]:
        out = imageops.resized_crop(x, top, left, h, w, size, flip=flip)
        for b in range(B):
            crop = x[b:b + 1, :, top[b]:top[b] + h[b], left[b]:left[b] + w[b]].double()
            ref = F.interpolate(crop, size=size, mode="bilinear", align_corners=False).round()[0]
            if flip[b]:
                ref = ref.flip(-1)
            d = (out[b].double() - ref).abs()
            # float32 two-pass blend vs float64: values near .5 may round either way.
            assert d.max() <= 1, f"box {b} size {size}: {worst(out[b], ref.to(torch.uint8))}"
            assert (d > 0).float().mean() < 0.05


def test_cutout_matches_naive_hole(images):
    cy = torch.tensor([0, 5, 12, 23, 8, 30])
    cx = torch.tensor([0, 20, 12, 3, 23, 2])
    out = imageops.cutout(images, cy, cx, 16)
    for b in range(images.shape[0]):
        ref = images[b].clone()
        ref[:, max(0, cy[b] - 8):max(0, cy[b] + 8), max(0, cx[b] - 8):max(0, cx[b] + 8)] = 0
        assert torch.equal(out[b], ref)


def test_normalize_matches_float64(images):
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    out = imageops.normalize(images, mean, std)
    ref = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64).view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5


# -------------------------------------------------------------------------------- photometric
def test_equalize_matches_pil(images):
    out = imageops.equalize(images)
    for b in range(images.shape[0]):
        ref = from_pil(ImageOps.equalize(to_pil(images[b])))
        assert torch.equal(out[b], ref), worst(out[b], ref)


def test_equalize_constant_image_unchanged():
    x = torch.full((2, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(imageops.equalize(x), x)


def test_autocontrast_matches_pil(images):
    x = (images.float() * 0.5 + 40).to(torch.uint8)  # a narrow range to stretch
    out = imageops.autocontrast(x)
    for b in range(x.shape[0]):
        ref = from_pil(ImageOps.autocontrast(to_pil(x[b])))
        # PIL truncates the stretched value, we round: at most one grey level apart.
        assert (out[b].int() - ref.int()).abs().max() <= 1, worst(out[b], ref)


def test_posterize_solarize_invert_match_pil(images):
    bits = torch.tensor([1, 2, 4, 6, 7, 8])
    thr = torch.tensor([0.0, 26.0, 128.0, 200.0, 255.0, 256.0])
    post, sol, inv = imageops.posterize(images, bits), imageops.solarize(images, thr), imageops.invert(images)
    for b in range(images.shape[0]):
        im = to_pil(images[b])
        assert torch.equal(post[b], from_pil(ImageOps.posterize(im, int(bits[b]))))
        assert torch.equal(sol[b], from_pil(ImageOps.solarize(im, float(thr[b]))))
        assert torch.equal(inv[b], from_pil(ImageOps.invert(im)))


@pytest.mark.parametrize("name", ["Color", "Brightness", "Contrast", "Sharpness"])
def test_enhance_ops_match_pil(images, name):
    factors = torch.tensor([0.1, 0.5, 1.0, 1.3, 1.9, 0.0])
    fn = {"Color": imageops.color, "Brightness": imageops.brightness, "Contrast": imageops.contrast,
          "Sharpness": imageops.sharpness}[name]
    enh = {"Color": ImageEnhance.Color, "Brightness": ImageEnhance.Brightness,
           "Contrast": ImageEnhance.Contrast, "Sharpness": ImageEnhance.Sharpness}[name]
    out = fn(images, factors)
    for b in range(images.shape[0]):
        ref = from_pil(enh(to_pil(images[b])).enhance(float(factors[b])))
        d = (out[b].int() - ref.int()).abs()
        # PIL blends in 8-bit fixed point and takes an integer mean for Contrast.
        assert d.max() <= 2, f"{name} factor {factors[b]}: {worst(out[b], ref)}"
        assert d.float().mean() < 0.6


def test_policy_rounds_apply_each_op_to_its_samples_only(images):
    B = images.shape[0]
    op = torch.tensor([OP_ID["Invert"], OP_ID["Equalize"], OP_ID["Invert"], OP_ID["Posterize"],
                       OP_ID["Solarize"], OP_ID["Invert"]])
    value = torch.tensor([0.0, 0.0, 0.0, 3.0, 100.0, 0.0])
    apply = torch.tensor([True, True, False, True, True, True])
    out = apply_rounds(images, [(op, value, apply)])
    expected = [imageops.invert(images[0:1]), imageops.equalize(images[1:2]), images[2:3],
                imageops.posterize(images[3:4], torch.tensor([3])), imageops.solarize(images[4:5], torch.tensor([100.0])),
                imageops.invert(images[5:6])]
    for b in range(B):
        assert torch.equal(out[b:b + 1], expected[b]), f"sample {b}"


def test_autoaugment_draw_follows_the_policy_table():
    g = torch.Generator().manual_seed(1)
    rounds = draw_autoaugment(20000, g)
    op0, _, apply0 = rounds[0]
    # Sub-policy 0 step 0 is Invert with p 0.1; Invert appears as a first step only there, so
    # the applied fraction of first-step Inverts is 0.1.
    inv = op0 == OP_ID["Invert"]
    assert abs(apply0[inv].float().mean().item() - 0.1) < 0.03
    # Each of the 25 sub-policies is chosen about uniformly: Rotate opens sub-policy 1 only.
    assert abs((op0 == OP_ID["Rotate"]).float().mean().item() - 1 / 25) < 0.01


def test_randaugment_magnitudes_and_probability():
    g = torch.Generator().manual_seed(2)
    rounds = draw_randaugment(20000, g)
    assert len(rounds) == 2
    op, value, apply = rounds[0]
    assert abs(apply.float().mean().item() - 0.5) < 0.02
    rot = value[op == OP_ID["Rotate"]].abs()
    assert abs(rot.mean().item() - 27.0) < 0.5  # 30 * 9 / 10, magnitude std 0.5
    post = value[op == OP_ID["Posterize"]]
    assert set(post.unique().tolist()) <= {0.0, 1.0, 2.0}  # 4 - floor(4 * m / 10), m ~ N(9, .5)


# ------------------------------------------------------------------------------ keyed params
def test_keyed_seed_is_a_pure_function():
    assert keyed_seed(0, 1, 2) == keyed_seed(0, 1, 2)
    seeds = {keyed_seed(s, t, c) for s in range(3) for t in range(3) for c in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**63 for s in seeds)


def test_draw_does_not_depend_on_call_order_or_global_rng():
    a = Augmenter("cifar-selfkd", 32, seed=7)
    first = a.draw(5, 64)
    torch.manual_seed(123)
    a.draw(9, 64)
    torch.rand(10)
    again = a.draw(5, 64)
    for k in first:
        if k == "policy":
            for r1, r2 in zip(first[k], again[k]):
                assert all(torch.equal(u, v) for u, v in zip(r1, r2))
        elif isinstance(first[k], torch.Tensor):
            assert torch.equal(first[k], again[k]), k
    other = a.draw(6, 64)
    assert not torch.equal(first["crop"], other["crop"])
    assert not torch.equal(Augmenter("cifar-selfkd", 32, seed=8).draw(5, 64)["crop"], first["crop"])


def test_select_rows_keeps_each_samples_parameters():
    a = Augmenter("vit", 32, seed=0)
    p = a.draw(3, 10)
    rows = torch.tensor([1, 4, 7])
    q = select_rows(p, rows)
    assert torch.equal(q["rrc"], p["rrc"][rows])
    assert torch.equal(q["policy"][1][1], p["policy"][1][1][rows])


def test_epoch_permutation_is_a_keyed_permutation():
    p0 = epoch_permutation(0, 0, 1000)
    assert torch.equal(p0.sort().values, torch.arange(1000))
    assert torch.equal(p0, epoch_permutation(0, 0, 1000))
    assert not torch.equal(p0, epoch_permutation(0, 1, 1000))
    assert not torch.equal(p0, epoch_permutation(1, 0, 1000))


def _torchvision_rrc_reference(u, H, W, scale, ratio):
    """torchvision's RandomResizedCrop.get_params written out in Python with given uniforms."""
    area = H * W
    for a in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(u[a, 0]))
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        ar = math.exp(log_r[0] + (log_r[1] - log_r[0]) * float(u[a, 1]))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= W and 0 < h <= H:
            return int(float(u[a, 2]) * (H - h + 1)), int(float(u[a, 3]) * (W - w + 1)), h, w
    in_ratio = W / H
    if in_ratio < min(ratio):
        w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = H, int(round(H * max(ratio)))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def test_rrc_boxes_follow_torchvision_rule():
    g = torch.Generator().manual_seed(3)
    u = torch.rand(300, 10, 4, generator=g)
    u[:20, :, 0] = 0.999  # force some all-attempts-fail cases on thin images
    H = torch.randint(20, 400, (300,), generator=g)
    W = torch.randint(20, 400, (300,), generator=g)
    W[:20] = H[:20] * 5
    boxes = rrc_boxes(u, H, W, (0.08, 1.0), (3 / 4, 4 / 3))
    for b in range(300):
        ref = _torchvision_rrc_reference(u[b], int(H[b]), int(W[b]), (0.08, 1.0), (3 / 4, 4 / 3))
        got = tuple(int(t[b]) for t in boxes)
        assert got == ref, f"sample {b}: {got} != {ref}"


def test_erase_boxes_lie_inside_and_follow_area_rule():
    g = torch.Generator().manual_seed(4)
    top, left, h, w, found = erase_boxes(torch.rand(500, 10, 4, generator=g), 32, 32)
    assert found.float().mean() > 0.9
    t, l_, hh, ww = top[found], left[found], h[found], w[found]
    assert (t >= 0).all() and (l_ >= 0).all() and (t + hh <= 32).all() and (l_ + ww <= 32).all()
    area = (hh * ww).float() / 1024
    assert area.min() > 0.01 and area.max() < 0.40


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_augmenter_replays_and_varies(images, recipe):
    a = Augmenter(recipe, 24, seed=11)
    x1 = a(images, a.draw(4, images.shape[0]))
    x2 = a(images, a.draw(4, images.shape[0]))
    assert x1.dtype == torch.float32 and x1.shape == (6, 3, 24, 24)
    assert torch.equal(x1, x2)
    if recipe != "none":
        assert not torch.equal(x1, a(images, a.draw(5, images.shape[0])))
