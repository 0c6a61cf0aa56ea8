"""AutoAugment (CIFAR-10 policy) and RandAugment as batched, keyed tensor imageops.

A policy is drawn as *rounds*: in each round every sample has one operation id, one value (the
magnitude already turned into the op's argument: a shear factor, a fraction of the image size, an
angle, an enhancement factor, a number of bits, a threshold) and an apply flag. Applying a round
groups the samples by operation (the grouping is computed from the CPU-side parameters, so it
costs no device sync) and runs each operation once on its group with ``imageops``.

Magnitude conventions: AutoAugment follows the published CIFAR-10 policy with torchvision's ten
magnitude bins; RandAugment follows timm's ``rand-m9-mstd0.5-inc1`` (DeiT): two ops drawn with
replacement from the "increasing" op set, each applied with probability 0.5, magnitude drawn from
``N(m, 0.5)`` clipped to ``[0, 10]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import imageops, pilops

OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Color", "Brightness",
    "Contrast", "Sharpness", "Posterize", "Solarize", "SolarizeAdd", "AutoContrast", "Equalize",
    "Invert",
)
OP_ID = {name: i for i, name in enumerate(OPS)}
_GEOMETRIC = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
_SIGNED = _GEOMETRIC | {"Color", "Brightness", "Contrast", "Sharpness"}

# The AutoAugment CIFAR-10 policy (Cubuk et al. 2019, appendix): 25 sub-policies of two
# (operation, probability, magnitude bin 0..9) steps.
CIFAR10_POLICY = (
    (("Invert", 0.1, 0), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 0), ("Equalize", 0.9, 0)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, 0), ("Equalize", 0.5, 0)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, 0), ("AutoContrast", 0.4, 0)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 0)),
    (("Equalize", 0.2, 0), ("AutoContrast", 0.6, 0)),
    (("Equalize", 0.2, 0), ("Equalize", 0.6, 0)),
    (("Color", 0.9, 9), ("Equalize", 0.6, 0)),
    (("AutoContrast", 0.8, 0), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 0)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 0), ("Solarize", 0.2, 3)),
    (("Equalize", 0.8, 0), ("Invert", 0.1, 0)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 0)),
)

# timm's "increasing" RandAugment op set.
RANDAUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
)


def _autoaugment_value(name: str, bin_: int) -> float:
    """Unsigned argument of ``name`` at magnitude bin ``bin_`` (torchvision's 10-bin tables)."""
    frac = bin_ / 9.0
    if name in ("ShearX", "ShearY"):
        return 0.3 * frac
    if name in ("TranslateX", "TranslateY"):
        return 150.0 / 331.0 * frac  # fraction of the image size
    if name == "Rotate":
        return 30.0 * frac
    if name in ("Color", "Brightness", "Contrast", "Sharpness"):
        return 0.9 * frac  # factor = 1 +- value
    if name == "Posterize":
        return float(8 - round(bin_ / (9 / 4)))
    if name == "Solarize":
        return 255.0 * (1.0 - frac)
    return 0.0


def _randaugment_value(name: str, level: Tensor) -> Tensor:
    """Unsigned argument of ``name`` at ``level = magnitude / 10`` (timm's "increasing" set)."""
    if name in ("ShearX", "ShearY"):
        return 0.3 * level
    if name in ("TranslateX", "TranslateY"):
        return 0.45 * level
    if name == "Rotate":
        return 30.0 * level
    if name in ("Color", "Brightness", "Contrast", "Sharpness"):
        return 0.9 * level
    if name == "Posterize":
        return 4.0 - torch.floor(level * 4.0)
    if name == "Solarize":
        return 256.0 - torch.floor(level * 256.0)
    if name == "SolarizeAdd":
        return torch.floor(level * 110.0)
    return torch.zeros_like(level)


# Tables for the vectorised AutoAugment draw: [25, 2] op ids, probabilities, unsigned values.
_AA_OP = torch.tensor([[OP_ID[s[0]] for s in sub] for sub in CIFAR10_POLICY], dtype=torch.long)
_AA_PROB = torch.tensor([[s[1] for s in sub] for sub in CIFAR10_POLICY], dtype=torch.float32)
_AA_VALUE = torch.tensor([[_autoaugment_value(s[0], s[2]) for s in sub] for sub in CIFAR10_POLICY],
                         dtype=torch.float32)
_SIGNED_MASK = torch.tensor([name in _SIGNED for name in OPS])
_ENHANCE_MASK = torch.tensor([name in ("Color", "Brightness", "Contrast", "Sharpness") for name in OPS])


def _finish_value(op: Tensor, value: Tensor, negative: Tensor) -> Tensor:
    """Apply the random sign to signed ops and turn enhancement magnitudes into factors."""
    signed = _SIGNED_MASK[op]
    value = torch.where(signed & negative, -value, value)
    return torch.where(_ENHANCE_MASK[op], 1.0 + value, value)


def draw_autoaugment(batch: int, g: torch.Generator) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Two rounds ``(op [B], value [B], apply [B])`` of the CIFAR-10 AutoAugment policy."""
    sub = torch.randint(0, len(CIFAR10_POLICY), (batch,), generator=g)
    u = torch.rand(batch, 2, generator=g)
    negative = torch.rand(batch, 2, generator=g) < 0.5
    rounds = []
    for j in range(2):
        op = _AA_OP[sub, j]
        value = _finish_value(op, _AA_VALUE[sub, j], negative[:, j])
        rounds.append((op, value, u[:, j] < _AA_PROB[sub, j]))
    return rounds


def draw_randaugment(batch: int, g: torch.Generator, *, num_ops: int = 2, magnitude: float = 9.0,
                     magnitude_std: float = 0.5, prob: float = 0.5) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``num_ops`` rounds of RandAugment (timm ``rand-m{magnitude}-mstd{std}-inc1`` semantics)."""
    table = torch.tensor([OP_ID[n] for n in RANDAUGMENT_OPS], dtype=torch.long)
    rounds = []
    for _ in range(num_ops):
        choice = torch.randint(0, len(RANDAUGMENT_OPS), (batch,), generator=g)
        apply = torch.rand(batch, generator=g) < prob
        m = magnitude + magnitude_std * torch.randn(batch, generator=g)
        level = m.clamp(0.0, 10.0) / 10.0
        negative = torch.rand(batch, generator=g) < 0.5
        op = table[choice]
        value = torch.zeros(batch)
        for name in RANDAUGMENT_OPS:
            sel = op == OP_ID[name]
            value = torch.where(sel, _randaugment_value(name, level), value)
        rounds.append((op, _finish_value(op, value, negative), apply))
    return rounds


def _geometric_inverse(name: str, value: Tensor, height: int, width: int) -> Tensor:
    """Output->input pixel maps ``[b, 2, 3]`` for the geometric policy ops (origin top-left for
    shear and translate, as PIL's ``Image.transform``; centre for rotate)."""
    b = value.shape[0]
    if name == "Rotate":
        return imageops.rotation_inverse(value, height, width)
    m = torch.zeros(b, 2, 3, dtype=torch.float64)
    m[:, 0, 0] = 1.0
    m[:, 1, 1] = 1.0
    if name == "ShearX":
        m[:, 0, 1] = value
    elif name == "ShearY":
        m[:, 1, 0] = value
    elif name == "TranslateX":
        m[:, 0, 2] = value * width
    elif name == "TranslateY":
        m[:, 1, 2] = value * height
    return m


def _pil_affine_data(name: str, value: Tensor, height: int, width: int) -> Tensor:
    """PIL's affine data ``[b, 6]`` of a geometric op, as timm's ops pass it to
    ``Image.transform`` / ``Image.rotate`` (rotation: PIL's own matrix, cosines rounded)."""
    if name == "Rotate":
        return torch.tensor([pilops.rotation_data(float(v), width, height) for v in value.tolist()],
                            dtype=torch.float64).view(-1, 6)
    return _geometric_inverse(name, value, height, width).view(-1, 6)


def _apply_op(name: str, x: Tensor, value: Tensor, fill: int | tuple[int, ...],
              resample: str = "nearest") -> Tensor:
    if name in _GEOMETRIC:
        if resample == "pil-bicubic":
            fills = (fill,) * x.shape[1] if isinstance(fill, int) else tuple(fill)
            data = _pil_affine_data(name, value, x.shape[2], x.shape[3])
            return pilops.affine_bicubic(x, data, fills)
        if not isinstance(fill, int):
            raise ValueError(f"nearest-neighbour policy ops take one fill value, got {fill!r}")
        inv = imageops.h2d(_geometric_inverse(name, value, x.shape[2], x.shape[3]), x.device)
        return imageops.affine_nearest(x, inv, fill)
    if name == "Color":
        return imageops.color(x, value)
    if name == "Brightness":
        return imageops.brightness(x, value)
    if name == "Contrast":
        return imageops.contrast(x, value)
    if name == "Sharpness":
        return imageops.sharpness(x, value)
    if name == "Posterize":
        return imageops.posterize(x, value)
    if name == "Solarize":
        return imageops.solarize(x, value)
    if name == "SolarizeAdd":
        return imageops.solarize_add(x, value)
    if name == "AutoContrast":
        return imageops.autocontrast(x)
    if name == "Equalize":
        return imageops.equalize(x)
    if name == "Invert":
        return imageops.invert(x)
    return x


POLICY_RESAMPLES = ("nearest", "pil-bicubic")


def apply_rounds(x: Tensor, rounds: list[tuple[Tensor, Tensor, Tensor]],
                 fill: int | tuple[int, ...] = 128, resample: str = "nearest") -> Tensor:
    """Apply policy rounds to ``uint8 [B, C, H, W]``; ``rounds`` hold CPU tensors of length B.

    ``resample``: how the geometric ops (shear, translate, rotate) sample: ``"nearest"`` (one
    ``fill`` value), or ``"pil-bicubic"`` (PIL's bicubic affine transform, as timm's RandAugment
    with ``interpolation="bicubic"``; ``fill`` may give one value per channel).
    """
    if resample not in POLICY_RESAMPLES:
        raise ValueError(f"unknown policy resampling {resample!r}; choose one of {POLICY_RESAMPLES}")
    if not rounds:
        return x
    x = x.clone()
    for op, value, apply in rounds:
        active = torch.where(apply, op, torch.zeros_like(op))  # not applied == Identity
        present = torch.unique(active).tolist()
        for op_id in present:
            name = OPS[op_id]
            if name == "Identity":
                continue
            rows = (active == op_id).nonzero().flatten()
            rows_dev = imageops.h2d(rows, x.device)
            sub = x[rows_dev]  # advanced indexing: several times faster than index_select for uint8 on CPU
            x.index_copy_(0, rows_dev, _apply_op(name, sub, value[rows], fill, resample))
    return x
