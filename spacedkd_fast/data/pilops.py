"""PIL's resampling rules as batched tensor ops, for recipes that must equal a PIL pipeline.

timm's ``create_transform`` (the official ViT pipeline) runs on PIL images: the random-resized
crop is ``Image.resize`` with the BICUBIC filter, RandAugment's geometric ops are
``Image.transform`` with BICUBIC and a fill colour, the test resize is ``Image.resize`` BILINEAR.
These functions follow PIL's arithmetic step by step (written from the behaviour of Pillow's
``Resample.c`` / ``Geometry.c``), so for the same parameters they give PIL's pixels:

- :func:`resized_crop`: separable convolution resampling (filter support widened by the scale
  when shrinking), coefficients rounded to 22-bit fixed point, horizontal pass first with a
  ``uint8`` result, then the vertical pass. Integer products and sums are exact in float64, so
  the matrix products reproduce PIL's integer sums bit for bit.
- :func:`affine_bicubic`: PIL's generic affine transform with its bicubic kernel (a = -1, four
  rows of four taps, edges clamped), truncated to ``uint8``; pixels whose source lies outside the
  image keep the fill colour.
- :func:`rotation_data`: the affine data ``Image.rotate`` computes (cosines rounded to 15 digits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .imageops import h2d

_PRECISION_BITS = 22  # PIL: 32 - 8 - 2


def _bicubic(x: Tensor) -> Tensor:  # PIL Resample.c, a = -0.5
    x = x.abs()
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _bilinear(x: Tensor) -> Tensor:
    x = x.abs()
    return torch.where(x < 1.0, 1.0 - x, torch.zeros_like(x))


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


def _check_filter(kind: str):
    if kind not in FILTERS:
        raise ValueError(f"unknown PIL filter {kind!r}; choose one of {sorted(FILTERS)}")
    return FILTERS[kind]


def resample_matrix(start: Tensor, extent: Tensor, out: int, size: int, kind: str) -> Tensor:
    """PIL's fixed-point weights for resizing the spans ``[start, start + extent)`` of an axis of
    length ``size`` to ``out`` samples: float64 ``[B, out, size]`` holding integers (x 2^22).

    Computed on the CPU in float64, tap by tap in PIL's order, so every coefficient is PIL's.
    """
    filt, base_support = _check_filter(kind)
    start = start.detach().cpu().long().view(-1)
    extent = extent.detach().cpu().long().view(-1)
    B = start.shape[0]
    ext = extent.double().view(B, 1)
    scale = ext / out  # PIL: (in1 - in0) / outSize
    filterscale = torch.clamp(scale, min=1.0)
    support = base_support * filterscale
    ss = 1.0 / filterscale
    center = (torch.arange(out, dtype=torch.float64).view(1, out) + 0.5) * scale  # [B, out]
    xmin = torch.trunc(center - support + 0.5).clamp(min=0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), ext) - xmin  # taps used
    ksize = int(math.ceil(float(support.max()))) * 2 + 1
    taps = []
    ww = torch.zeros(B, out, dtype=torch.float64)
    for t in range(ksize):  # sequential sum, as PIL
        w = filt(((t + xmin) - center + 0.5) * ss)
        w = torch.where(t < xmax, w, torch.zeros_like(w))
        taps.append(w)
        ww = ww + w
    k = torch.stack(taps, dim=2)
    k = torch.where(ww.unsqueeze(2) != 0, k / ww.unsqueeze(2), k)
    one = float(1 << _PRECISION_BITS)
    k = torch.where(k < 0, torch.trunc(-0.5 + k * one), torch.trunc(0.5 + k * one))
    cols = (start.view(B, 1, 1) + xmin.long().unsqueeze(2)
            + torch.arange(ksize).view(1, 1, ksize))
    valid = torch.arange(ksize).view(1, 1, ksize) < xmax.long().unsqueeze(2)
    k = torch.where(valid, k, torch.zeros_like(k))
    mat = torch.zeros(B, out, size + ksize, dtype=torch.float64)  # room for masked taps
    mat.scatter_add_(2, torch.where(valid, cols, torch.full_like(cols, size)), k)
    return mat[:, :, :size]


def _clip8(acc: Tensor) -> Tensor:
    """PIL's ``clip8``: ``(sum + 2^21) >> 22`` clamped to ``[0, 255]`` (exact in float64)."""
    half = float(1 << (_PRECISION_BITS - 1))
    return torch.floor((acc + half) / float(1 << _PRECISION_BITS)).clamp_(0, 255)


def resized_crop(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor,
                 size: tuple[int, int], kind: str = "bicubic", flip: Tensor | None = None
                 ) -> Tensor:
    """PIL's ``img.crop(box).resize(size, filter)`` per sample, then mirror the samples whose
    ``flip`` is true: ``uint8 [B, C, H, W] -> uint8 [B, C, size[0], size[1]]``.

    Box parameters are int ``[B]`` tensors (any device; coefficients are built on the CPU).
    """
    B, C, H, W = x.shape
    oh, ow = size
    dev = x.device
    wx = resample_matrix(left, width, ow, W, kind)  # [B, ow, W]
    wy = resample_matrix(top, height, oh, H, kind)  # [B, oh, H]
    if flip is not None:
        f = flip.detach().cpu().bool().view(B, 1, 1)
        wx = torch.where(f, wx.flip(1), wx)
    wx = h2d(wx, dev).transpose(1, 2).unsqueeze(1)  # [B, 1, W, ow]
    wy = h2d(wy, dev).unsqueeze(1)  # [B, 1, oh, H]
    xf = x.double()
    # Each pass rounds to uint8, so the order of the passes changes pixels. Pillow 13 runs the
    # vertical pass first when the height shrinks much more than the width. Measured: always
    # when the height shrinks and the width does not; never when the height does not shrink.
    # When both shrink its rule is not reproduced here (horizontal first; then a few grey levels
    # may differ). Upscaling a 32 or 64 px image to 224 px, as the official recipes do, is exact.
    h_cpu, w_cpu = height.detach().cpu().long().view(-1), width.detach().cpu().long().view(-1)
    vertical_first = (oh < h_cpu) & (ow >= w_cpu)
    if not bool(vertical_first.any()):
        return _clip8(torch.matmul(wy, _clip8(torch.matmul(xf, wx)))).to(torch.uint8)
    if bool(vertical_first.all()):
        return _clip8(torch.matmul(_clip8(torch.matmul(wy, xf)), wx)).to(torch.uint8)
    out = torch.empty(B, C, oh, ow, dtype=torch.uint8, device=dev)
    for first_v in (False, True):
        rows = h2d((vertical_first == first_v).nonzero().flatten(), dev)
        xs, wxs, wys = xf[rows], wx[rows], wy[rows]
        if first_v:
            res = _clip8(torch.matmul(_clip8(torch.matmul(wys, xs)), wxs))
        else:
            res = _clip8(torch.matmul(wys, _clip8(torch.matmul(xs, wxs))))
        out[rows] = res.to(torch.uint8)
    return out


def rotation_data(angle_deg: float, width: int, height: int) -> tuple[float, ...]:
    """The affine data ``(a, b, c, d, e, f)`` (output -> input) of ``Image.rotate(angle_deg)``."""
    angle = -math.radians(angle_deg % 360.0)
    cos_a, sin_a = round(math.cos(angle), 15), round(math.sin(angle), 15)
    m = [cos_a, sin_a, 0.0, round(-math.sin(angle), 15), cos_a, 0.0]
    cx, cy = width / 2, height / 2
    m[2] = m[0] * -cx + m[1] * -cy + m[2]
    m[5] = m[3] * -cx + m[4] * -cy + m[5]
    m[2] += cx
    m[5] += cy
    return tuple(m)


def _cubic(v1: Tensor, v2: Tensor, v3: Tensor, v4: Tensor, d: Tensor) -> Tensor:
    """PIL Geometry.c's cubic through four samples (a = -1) with its rounding: ``p1 = v2``,
    ``p2 = -v1 + v3``, ``p3 = 2 (v1 - v2) + v3 - v4``, ``p4 = -v1 + v2 - v3 + v4``,
    ``p1 + d (p2 + d (p3 + d p4))``, evaluated left to right (``-a + b`` is ``b - a`` exactly);
    in place where a temporary is ours, as the op is memory-bound."""
    p3 = (v1 - v2).mul_(2).add_(v3).sub_(v4)
    p4 = (v2 - v1).sub_(v3).add_(v4)
    return p4.mul_(d).add_(p3).mul_(d).add_(v3 - v1).mul_(d).add_(v2)


def affine_bicubic(x: Tensor, data: Tensor, fill: tuple[int, ...]) -> Tensor:
    """``Image.transform(size, AFFINE, data, BICUBIC, fillcolor=fill)`` per sample.

    ``data``: float64 ``[B, 6]`` (output pixel centre -> input point, PIL's ``(a, b, c, d, e,
    f)``); ``fill``: one value per channel. ``uint8 [B, C, H, W] -> uint8 [B, C, H, W]``.
    """
    B, C, H, W = x.shape
    dev = x.device
    a = h2d(data.double(), dev)
    xi = (torch.arange(W, device=dev, dtype=torch.float64) + 0.5).view(1, 1, W)
    yi = (torch.arange(H, device=dev, dtype=torch.float64) + 0.5).view(1, H, 1)
    col = lambda j: a[:, j].view(B, 1, 1)  # noqa: E731
    sx = (col(0) * xi + col(1) * yi) + col(2)  # [B, H, W]
    sy = (col(3) * xi + col(4) * yi) + col(5)
    inside = (sx >= 0) & (sx < W) & (sy >= 0) & (sy < H)
    sx, sy = sx - 0.5, sy - 0.5
    x0, y0 = torch.floor(sx), torch.floor(sy)
    dx, dy = (sx - x0).unsqueeze(1), (sy - y0).unsqueeze(1)
    x0, y0 = x0.long() - 1, y0.long() - 1
    xf = x.double().reshape(B, C, H * W)
    cols = [(x0 + i).clamp(0, W - 1) for i in range(4)]
    rows = []
    for j in range(4):
        r = (y0 + j).clamp(0, H - 1) * W
        taps = [torch.gather(xf, 2, (r + c).view(B, 1, H * W).expand(B, C, H * W)).view(B, C, H, W)
                for c in cols]
        rows.append(_cubic(*taps, dx))
    v = _cubic(*rows, dy)
    v = torch.where(v <= 0.0, torch.zeros_like(v), torch.where(v >= 255.0, torch.full_like(v, 255.0), v))
    out = torch.trunc(v).to(torch.uint8)
    fill_t = torch.tensor(fill, dtype=torch.uint8, device=dev).view(1, C, 1, 1)
    return torch.where(inside.unsqueeze(1), out, fill_t)
