"""Keyed augmentation: recipes, per-batch parameters drawn from ``(seed, step)``, batched application.

:class:`Augmenter` splits the work in three stages so that backends can share it:

1. ``draw(key, batch)``: every random choice of a batch (crop offsets, flips, angles,
   random-resized-crop attempts, policy ops and magnitudes, Cutout centres, erasing boxes) as CPU
   tensors of ``batch`` rows, from a generator keyed by ``(seed, key)``. Rows are samples of the
   *global* batch; a distributed rank takes its rows with :func:`select_rows`.
2. ``geometric(x, p)``: crop + flip + rotation, or random-resized crop + flip (DALI can do this
   stage instead, from the same parameters).
3. ``photometric(x, p)`` then ``finish(x, p)``: policy ops and Cutout on uint8, then normalisation
   and random erasing in float.

Order of operations per recipe (as the official transforms): ``cifar``: crop(pad 4) -> flip ->
rotate(15) -> normalise. ``cifar-selfkd``: crop(pad 4, fill 128) -> flip -> AutoAugment -> Cutout
(16) -> normalise. ``tiny``: crop(pad 4) -> flip -> normalise. ``imagenet``: random-resized crop ->
flip -> normalise. ``vit``: random-resized crop -> flip -> RandAugment m9 -> normalise -> random
erasing 0.25. ``vit-official``: the same steps with PIL's resampling as timm's
``create_transform`` runs them in the official ViT code (bicubic crop, bicubic policy ops filled
with the ImageNet mean, ImageNet statistics, bilinear test resize, ``drop_last``; see
:data:`VIT_OFFICIAL`). ``none``: normalise. Test images: normalise; resized to the output size when it
differs (``imagenet``: resize 256 / centre crop 224 as one resized crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import imageops, pilops
from .keyed import STREAM_AUGMENT, STREAM_NOISE, keyed_generator, keyed_seed, stream_tag
from .policies import POLICY_RESAMPLES, apply_rounds, draw_autoaugment, draw_randaugment

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ATTEMPTS = 10  # rejection-sampling attempts of random-resized crop and random erasing

# How images are resized: "bilinear" (batched half-pixel bilinear, no antialiasing: fast, the
# torch backends' default) or PIL's own filters, reproduced exactly ("pil-bicubic", "pil-bilinear").
RESAMPLES = ("bilinear", "pil-bicubic", "pil-bilinear")


@dataclass(frozen=True)
class Recipe:
    """A training augmentation recipe (see the module docstring for the order of operations).

    ``mean``/``std`` of ``None`` take the data set's statistics.
    """

    name: str
    crop_padding: int | None = None
    crop_fill: int = 0
    random_resized_crop: bool = False
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    rotate_degrees: float = 0.0
    policy: str | None = None  # "autoaugment-cifar10" | "randaugment"
    policy_fill: int | tuple[int, int, int] = 128
    policy_resample: str = "nearest"  # geometric policy ops: "nearest" | "pil-bicubic"
    randaugment_ops: int = 2
    randaugment_magnitude: float = 9.0
    randaugment_std: float = 0.5
    cutout_length: int = 0
    erasing_p: float = 0.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    test_crop_fraction: float = 1.0  # imagenet: 224 / 256
    resample: str = "bilinear"  # random-resized crop and training resizes (see RESAMPLES)
    test_resample: str = "bilinear"  # the evaluation resize
    drop_last: bool = False  # the training stream drops the last partial batch by default


# The official ViT pipeline (OFFICIAL_VIT_FACTS 1.1): timm ``create_transform(is_training=True,
# auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, re_mode="pixel", interpolation="bicubic")``
# on PIL images: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bicubic) + flip 0.5, RandAugment
# (2 ops from the "increasing" set, p 0.5, magnitude N(9, 0.5); geometric ops bicubic, filled
# with the ImageNet mean in 8 bits as timm does), ImageNet mean/std, RandomErasing(0.25, per-pixel
# normal noise); test: Resize((S, S)) bilinear; train loaders with drop_last.
VIT_OFFICIAL = Recipe(
    "vit-official", random_resized_crop=True, flip=True, policy="randaugment",
    policy_fill=tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
    policy_resample="pil-bicubic", erasing_p=0.25, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    resample="pil-bicubic", test_resample="pil-bilinear", drop_last=True)


RECIPES: dict[str, Recipe] = {
    "cifar": Recipe("cifar", crop_padding=4, flip=True, rotate_degrees=15.0),
    "cifar-selfkd": Recipe("cifar-selfkd", crop_padding=4, crop_fill=128, flip=True,
                           policy="autoaugment-cifar10", cutout_length=16,
                           mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "tiny": Recipe("tiny", crop_padding=4, flip=True),
    "imagenet": Recipe("imagenet", random_resized_crop=True, flip=True, test_crop_fraction=224 / 256),
    "vit": Recipe("vit", random_resized_crop=True, flip=True, policy="randaugment", erasing_p=0.25),
    "vit-official": VIT_OFFICIAL,
    "none": Recipe("none"),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (one of :data:`RECIPES`)."""
    if name not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def select_rows(params: dict, rows: Tensor) -> dict:
    """The parameters of the samples ``rows`` (a CPU int64 index) of a drawn batch."""
    out = {}
    for k, v in params.items():
        if isinstance(v, Tensor):
            out[k] = v.index_select(0, rows)
        elif k == "policy":
            out[k] = [tuple(t.index_select(0, rows) for t in rnd) for rnd in v]
        else:
            out[k] = v
    return out


def rrc_boxes(draws: Tensor, heights: Tensor, widths: Tensor, scale: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random-resized-crop boxes ``(top, left, h, w)`` (int64 ``[B]``) from uniform draws
    ``[B, 10, 4]`` and the images' sizes, with torchvision's rule: the first of ten attempts
    (area fraction in ``scale``, log-uniform aspect in ``ratio``) that fits, else a centre crop
    clamped to ``ratio``."""
    H = heights.double().view(-1, 1)
    W = widths.double().view(-1, 1)
    u = draws.double()
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    top = torch.floor(u[..., 2] * (H - h + 1))
    left = torch.floor(u[..., 3] * (W - w + 1))
    first = ok.long().argmax(dim=1, keepdim=True)
    any_ok = ok.any(dim=1)
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    # Fallback: the whole image, clamped to the aspect-ratio range, centred.
    Hf, Wf = H.squeeze(1), W.squeeze(1)
    in_ratio = Wf / Hf
    fw = torch.where(in_ratio < ratio[0], Wf, torch.where(in_ratio > ratio[1], torch.round(Hf * ratio[1]), Wf))
    fh = torch.where(in_ratio < ratio[0], torch.round(Wf / ratio[0]), Hf)
    ft = torch.floor((Hf - fh) / 2)
    fl = torch.floor((Wf - fw) / 2)
    sel = lambda a, b: torch.where(any_ok, pick(a), b).long()  # noqa: E731
    return sel(top, ft), sel(left, fl), sel(h, fh), sel(w, fw)


def erase_boxes(draws: Tensor, height: int, width: int, area: tuple[float, float] = (0.02, 1 / 3),
                log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))):
    """Random-erasing rectangles (timm's rule: first of ten attempts with ``h < H and w < W``).

    Returns ``(top, left, h, w, found)`` int64/bool ``[B]``.
    """
    u = draws.double()
    target = height * width * (area[0] + (area[1] - area[0]) * u[..., 0])
    aspect = torch.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * u[..., 1])
    h = torch.round(torch.sqrt(target * aspect))
    w = torch.round(torch.sqrt(target / aspect))
    ok = (h < height) & (w < width) & (h > 0) & (w > 0)
    top = torch.floor(u[..., 2] * (height - h + 1))
    left = torch.floor(u[..., 3] * (width - w + 1))
    first = ok.long().argmax(dim=1, keepdim=True)
    pick = lambda t: t.gather(1, first).squeeze(1).long()  # noqa: E731
    return pick(top), pick(left), pick(h), pick(w), ok.any(dim=1)


class Augmenter:
    """Keyed, batched augmentation of one recipe at one output size.

    ``out_size``: ``(H, W)`` of the produced images; ``mean``/``std``: normalisation (the
    recipe's own take precedence). All methods take and return tensors on the caller's device.
    """

    def __init__(self, recipe: Recipe | str, out_size: int | tuple[int, int], *, seed: int = 0,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
        self.out_size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
        self.seed = int(seed)
        self.mean = tuple(self.recipe.mean or mean)
        self.std = tuple(self.recipe.std or std)
        r = self.recipe
        if r.policy not in (None, "autoaugment-cifar10", "randaugment"):
            raise ValueError(f"unknown policy {r.policy!r}")
        for field, value, allowed in (("resample", r.resample, RESAMPLES),
                                      ("test_resample", r.test_resample, RESAMPLES),
                                      ("policy_resample", r.policy_resample, POLICY_RESAMPLES)):
            if value not in allowed:
                raise ValueError(f"recipe {r.name!r}: unknown {field} {value!r}; choose one of "
                                 f"{allowed}")

    def with_recipe(self, recipe: Recipe) -> Augmenter:
        return Augmenter(replace(recipe), self.out_size, seed=self.seed, mean=self.mean, std=self.std)

    # ------------------------------------------------------------------------------- drawing
    def draw(self, key: int, batch: int, stream: int = 0) -> dict:
        """All random choices of the batch named ``key`` (``batch`` global rows), CPU tensors.

        Depends only on ``(seed, stream, key, batch)``: replaying a key draws the same values;
        data stream ``stream > 0`` draws independently of stream 0 for the same key.
        """
        r = self.recipe
        g = keyed_generator(self.seed, stream_tag(STREAM_AUGMENT, stream), key)
        p: dict = {"key": int(key), "stream": int(stream)}
        if r.crop_padding is not None:
            p["crop"] = torch.rand(batch, 2, generator=g)
        if r.random_resized_crop:
            p["rrc"] = torch.rand(batch, _ATTEMPTS, 4, generator=g)
        if r.flip:
            p["flip"] = torch.rand(batch, generator=g) < 0.5
        if r.rotate_degrees:
            p["angle"] = (torch.rand(batch, generator=g) * 2 - 1) * r.rotate_degrees
        if r.policy == "autoaugment-cifar10":
            p["policy"] = draw_autoaugment(batch, g)
        elif r.policy == "randaugment":
            p["policy"] = draw_randaugment(batch, g, num_ops=r.randaugment_ops,
                                           magnitude=r.randaugment_magnitude,
                                           magnitude_std=r.randaugment_std)
        if r.cutout_length:
            p["cutout"] = torch.rand(batch, 2, generator=g)
        if r.erasing_p:
            p["erase_apply"] = torch.rand(batch, generator=g) < r.erasing_p
            p["erase"] = torch.rand(batch, _ATTEMPTS, 4, generator=g)
        return p

    # ---------------------------------------------------------------- parameters in pixels
    def crop_offsets(self, p: dict) -> tuple[Tensor, Tensor]:
        """``(top, left)`` of the padded random crop, relative to the unpadded image (may be < 0)."""
        pad = self.recipe.crop_padding or 0
        off = torch.floor(p["crop"] * (2 * pad + 1)).long() - pad
        return off[:, 0], off[:, 1]

    def boxes(self, p: dict, heights: Tensor, widths: Tensor):
        """Random-resized-crop boxes for images of the given sizes (int64 ``[B]`` each)."""
        r = self.recipe
        return rrc_boxes(p["rrc"], heights, widths, r.rrc_scale, r.rrc_ratio)

    def crop_geometry(self, p: dict, heights: Tensor, widths: Tensor):
        """``(top, left, h, w, flip)`` of each row of the drawn batch ``p``: the box of its
        random-resized crop (the whole image when the recipe has none) in pixels of images of
        the given sizes, and its flip (``None`` when the recipe has none). What precomputed
        teacher maps follow (``data.feature_cache``); see :meth:`check_crop_geometry`."""
        self.check_crop_geometry()
        if self.recipe.random_resized_crop:
            top, left, h, w = self.boxes(p, heights, widths)
        else:
            top = left = torch.zeros_like(heights, dtype=torch.long)
            h, w = heights.long(), widths.long()
        return top, left, h, w, p.get("flip")

    def check_crop_geometry(self) -> None:
        """``ValueError`` for a recipe whose geometry is more than a crop box and a flip."""
        r = self.recipe
        extra = [what for what, on in (("a padded crop", r.crop_padding is not None),
                                       ("a rotation", bool(r.rotate_degrees))) if on]
        if extra:
            raise ValueError(f"augmentation recipe {r.name!r} has {' and '.join(extra)}; "
                             "precomputed teacher maps follow only a random-resized crop and a "
                             "flip (e.g. --augment vit-official)")

    # ----------------------------------------------------------------------------- stages
    def resize(self, x: Tensor, top: Tensor, left: Tensor, h: Tensor, w: Tensor,
               flip: Tensor | None = None, *, test: bool = False) -> Tensor:
        """Boxes ``(top, left, h, w)`` of ``uint8 [B, C, H, W]`` resized to the output size with
        the recipe's resampling (``test``: the evaluation one), mirrored where ``flip``."""
        kind = self.recipe.test_resample if test else self.recipe.resample
        if kind == "bilinear":
            return imageops.resized_crop(x, top, left, h, w, self.out_size, flip=flip)
        return pilops.resized_crop(x, top, left, h, w, self.out_size, kind[len("pil-"):], flip=flip)

    def geometric(self, x: Tensor, p: dict) -> Tensor:
        """Crop/flip/rotate or random-resized crop/flip: ``uint8 [B, C, H, W] -> [B, C, oh, ow]``."""
        r = self.recipe
        B, _, H, W = x.shape
        oh, ow = self.out_size
        flip = p.get("flip")
        flip_dev = imageops.h2d(flip, x.device) if flip is not None else None
        if r.random_resized_crop:
            full = torch.full((B,), H), torch.full((B,), W)
            top, left, h, w = self.boxes(p, *full)
            return self.resize(x, top, left, h, w, flip=flip_dev)
        if (H, W) != (oh, ow):  # crop recipes work at the output size: resize whole images first
            zeros = torch.zeros(B, dtype=torch.long)
            x = imageops.resized_crop(x, zeros, zeros, torch.full((B,), H), torch.full((B,), W), (oh, ow))
        if r.crop_padding is not None:
            top, left = self.crop_offsets(p)
            x = imageops.crop_flip(x, imageops.h2d(top, x.device), imageops.h2d(left, x.device),
                              (oh, ow), flip_dev, fill=r.crop_fill)
        elif flip_dev is not None:
            x = torch.where(flip_dev.view(B, 1, 1, 1), x.flip(-1), x)
        if r.rotate_degrees:
            x = imageops.rotate_nearest(x, p["angle"], fill=0)
        return x

    def photometric(self, x: Tensor, p: dict) -> Tensor:
        """Policy ops and Cutout on ``uint8 [B, C, H, W]``."""
        r = self.recipe
        if "policy" in p:
            x = apply_rounds(x, p["policy"], fill=r.policy_fill, resample=r.policy_resample)
        if r.cutout_length:
            H, W = x.shape[2:]
            c = imageops.h2d(torch.floor(p["cutout"] * torch.tensor([H, W])).long(), x.device)
            x = imageops.cutout(x, c[:, 0], c[:, 1], r.cutout_length, value=0)
        return x

    def finish(self, x: Tensor, p: dict | None) -> Tensor:
        """Normalise ``uint8 -> float32`` and apply random erasing (per-pixel normal noise)."""
        y = imageops.normalize(x, self.mean, self.std)
        if p is None or not self.recipe.erasing_p:
            return y
        B, C, H, W = y.shape
        top, left, h, w, found = erase_boxes(p["erase"], H, W)
        apply = p["erase_apply"] & found
        if not bool(apply.any()):
            return y
        rows = apply.nonzero().flatten()
        # Noise from a generator on the output's device keyed by (seed, key): replayable on one
        # device; CPU and CUDA generators give different values (positions still agree).
        tag = stream_tag(STREAM_NOISE, p.get("stream", 0))
        g = keyed_generator(self.seed, tag, p["key"], device=y.device)
        noise = torch.randn(len(rows), C, H, W, generator=g, device=y.device)
        ys = torch.arange(H).view(1, H)
        xs = torch.arange(W).view(1, W)
        t, l_, hh, ww = (v[rows].view(-1, 1) for v in (top, left, h, w))
        mask = ((ys >= t) & (ys < t + hh)).view(-1, 1, H, 1) & ((xs >= l_) & (xs < l_ + ww)).view(-1, 1, 1, W)
        rows_dev = imageops.h2d(rows, y.device)
        sub = torch.where(imageops.h2d(mask, y.device), noise, y.index_select(0, rows_dev))
        return y.index_copy(0, rows_dev, sub)

    def __call__(self, x: Tensor, p: dict) -> Tensor:
        """All stages: ``uint8 [B, C, H, W] -> float32 [B, C, oh, ow]``."""
        return self.finish(self.photometric(self.geometric(x, p), p), p)

    # ---------------------------------------------------------------------------- test time
    def test_boxes(self, heights: Tensor, widths: Tensor):
        """Centre boxes of the evaluation transform (resize + centre crop as one resized crop)."""
        f = self.recipe.test_crop_fraction
        oh, ow = self.out_size
        H, W = heights.double(), widths.double()
        if f >= 1.0 and (oh, ow) != (0, 0):
            return (torch.zeros_like(heights), torch.zeros_like(widths), heights.long(), widths.long())
        side = torch.round(torch.minimum(H, W) * f)
        # Keep the output aspect: a square output takes a square box.
        bh = side if oh == ow else torch.round(side * oh / max(oh, ow))
        bw = side if oh == ow else torch.round(side * ow / max(oh, ow))
        return (torch.floor((H - bh) / 2).long(), torch.floor((W - bw) / 2).long(), bh.long(), bw.long())

    def test_transform(self, x: Tensor) -> Tensor:
        """Evaluation: ``uint8 [B, C, H, W] -> float32 [B, C, oh, ow]`` (no randomness)."""
        B, _, H, W = x.shape
        if (H, W) != self.out_size or self.recipe.test_crop_fraction < 1.0:
            top, left, h, w = self.test_boxes(torch.full((B,), H), torch.full((B,), W))
            x = self.resize(x, top, left, h, w, test=True)
        return imageops.normalize(x, self.mean, self.std)


def noise_seed(seed: int, key: int, stream: int = 0) -> int:
    """The seed of the erasing-noise generator of ``key`` on ``stream`` (exposed for tests)."""
    return keyed_seed(seed, stream_tag(STREAM_NOISE, stream), key)
