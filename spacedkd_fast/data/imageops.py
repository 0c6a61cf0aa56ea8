"""Batched image operations on ``uint8 [B, C, H, W]`` tensors with per-sample parameters.

Every function works on whole batches with tensor ops (gathers, elementwise math, scatter-add
histograms), on CPU or CUDA alike, with no per-sample Python. Geometric ops compute the source
pixel of each output pixel and gather it (nearest) or blend four of them (bilinear), so crop,
flip and nearest rotation are exact pixel copies. Parameters are ``[B]`` tensors on ``x``'s device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def h2d(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; CPU -> CUDA goes through pinned memory so the copy is asynchronous
    (a copy from pageable memory would stall the host until the GPU queue drains)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _gather_pixels(x: Tensor, ys: Tensor, xs: Tensor, valid: Tensor | None, fill: float) -> Tensor:
    """``out[b, c, i, j] = x[b, c, ys[b, i, j], xs[b, i, j]]`` (``fill`` where not ``valid``).

    ``ys``/``xs``: int64 ``[B, h, w]`` already clamped into the image.
    """
    B, C, H, W = x.shape
    h, w = ys.shape[1:]
    flat = (ys * W + xs).view(B, 1, h * w).expand(B, C, h * w)
    out = torch.gather(x.reshape(B, C, H * W), 2, flat).view(B, C, h, w)
    if valid is not None:
        out = torch.where(valid.unsqueeze(1), out, torch.full((), fill, dtype=x.dtype, device=x.device))
    return out


def crop_flip(x: Tensor, top: Tensor, left: Tensor, size: tuple[int, int], flip: Tensor | None,
              fill: float = 0) -> Tensor:
    """Crop ``size = (h, w)`` windows at ``(top, left)`` (may lie outside: padding with ``fill``),
    then mirror the rows of samples whose ``flip`` is true. ``[B, C, H, W] -> [B, C, h, w]``.

    Equals ``RandomCrop(padding=p, fill=fill)`` + ``RandomHorizontalFlip`` with
    ``top = offset_y - p``, ``left = offset_x - p``.
    """
    B, _, H, W = x.shape
    h, w = size
    dev = x.device
    ys = top.view(B, 1).long() + torch.arange(h, device=dev).view(1, h)  # [B, h]
    cols = torch.arange(w, device=dev).view(1, w).expand(B, w)
    if flip is not None:
        cols = torch.where(flip.view(B, 1).bool(), (w - 1) - cols, cols)
    xs = left.view(B, 1).long() + cols  # [B, w]
    valid = ((ys >= 0) & (ys < H)).view(B, h, 1) & ((xs >= 0) & (xs < W)).view(B, 1, w)
    ys_c = ys.clamp(0, H - 1).view(B, h, 1).expand(B, h, w)
    xs_c = xs.clamp(0, W - 1).view(B, 1, w).expand(B, h, w)
    return _gather_pixels(x, ys_c, xs_c, valid, fill)


def affine_nearest(x: Tensor, inverse: Tensor, fill: float = 0) -> Tensor:
    """Nearest-neighbour affine warp in continuous pixel coordinates (pixel ``(i, j)`` covers
    ``[j, j+1) x [i, i+1)``, as PIL's ``Image.transform``): the output pixel centre
    ``(u + 0.5, v + 0.5)`` reads the input pixel containing ``inverse @ [u + 0.5, v + 0.5, 1]``;
    outside the image gives ``fill``. ``inverse``: float ``[B, 2, 3]`` (output -> input).
    """
    B, _, H, W = x.shape
    dev = x.device
    # float64: source coordinates often land exactly on pixel edges (shear 0.2 at a pixel
    # centre), where float32 rounding would flip the nearest pixel. Each coordinate is an outer
    # sum of a row term and a column term: one pass over [B, H, W].
    u = torch.arange(W, device=dev, dtype=torch.float64) + 0.5
    v = torch.arange(H, device=dev, dtype=torch.float64) + 0.5
    m = h2d(inverse, dev).double()
    sx = (m[:, 0, 0, None] * u).view(B, 1, W) + (m[:, 0, 1, None] * v + m[:, 0, 2, None]).view(B, H, 1)
    sy = (m[:, 1, 0, None] * u).view(B, 1, W) + (m[:, 1, 1, None] * v + m[:, 1, 2, None]).view(B, H, 1)
    xs = torch.floor(sx).long()
    ys = torch.floor(sy).long()
    valid = (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
    return _gather_pixels(x, ys.clamp(0, H - 1), xs.clamp(0, W - 1), valid, fill)


def rotation_inverse(angle_deg: Tensor, height: int, width: int) -> Tensor:
    """Inverse matrices ``[B, 2, 3]`` (continuous coordinates) of a counter-clockwise rotation by
    ``angle_deg`` about the image centre ``(W / 2, H / 2)``, y pointing down."""
    a = torch.deg2rad(angle_deg.double())
    c, s = torch.cos(a), torch.sin(a)
    cx, cy = width / 2.0, height / 2.0
    # source = R^-1 (out - centre) + centre; with y down a CCW turn has R^-1 = [[c, -s], [s, c]]
    m = torch.zeros(angle_deg.shape[0], 2, 3, dtype=torch.float64)
    m[:, 0, 0], m[:, 0, 1] = c, -s
    m[:, 1, 0], m[:, 1, 1] = s, c
    m[:, 0, 2] = cx - c * cx + s * cy
    m[:, 1, 2] = cy - s * cx - c * cy
    return m


def rotate_nearest(x: Tensor, angle_deg: Tensor, fill: float = 0) -> Tensor:
    """Rotate each image counter-clockwise by ``angle_deg[b]`` degrees about its centre, nearest
    neighbour, corners filled with ``fill`` (as ``RandomRotation`` with its default interpolation)."""
    inv = h2d(rotation_inverse(angle_deg.cpu(), x.shape[2], x.shape[3]), x.device)
    return affine_nearest(x, inv, fill)


# Sources up to this many pixels are resampled with two small matrix products (fast for the
# upscaling of 32-px images to 224 px); larger ones with gathers of the two neighbours.
MATMUL_MAX_PIXELS = 96 * 96


def _axis_coords(start: Tensor, extent: Tensor, n: int, dev: torch.device):
    """Bilinear taps along one axis: ``(i0, i1, frac)`` of shape ``[B, n]`` for output samples at
    half-pixel centres of the box ``[start, start + extent)``, clamped to the box."""
    B = start.shape[0]
    start = h2d(start, dev).float().view(B, 1)
    extent = h2d(extent, dev).float().view(B, 1)
    pos = start + (torch.arange(n, device=dev, dtype=torch.float32).view(1, n) + 0.5) * (extent / n) - 0.5
    pos = torch.minimum(torch.maximum(pos, start), start + extent - 1)
    i0 = pos.floor()
    frac = pos - i0
    i0 = i0.long()
    i1 = torch.minimum(i0 + 1, (start + extent - 1).long())
    return i0, i1, frac


def _tap_matrix(i0: Tensor, i1: Tensor, frac: Tensor, size: int) -> Tensor:
    """Dense interpolation weights ``[B, n, size]`` (two taps per row)."""
    B, n = i0.shape
    w = torch.zeros(B, n, size, device=i0.device, dtype=torch.float32)
    w.scatter_add_(2, i0.unsqueeze(2), (1 - frac).unsqueeze(2))
    w.scatter_add_(2, i1.unsqueeze(2), frac.unsqueeze(2))
    return w


def resized_crop(x: Tensor, top: Tensor, left: Tensor, height: Tensor, width: Tensor,
                 size: tuple[int, int], flip: Tensor | None = None) -> Tensor:
    """Crop the box ``(top, left, height, width)`` of each image and resize it to ``size`` with
    bilinear interpolation (half-pixel centres, edges clamped to the box, no antialiasing), then
    mirror the samples whose ``flip`` is true (folded into the column taps: free).

    ``[B, C, H, W]`` uint8 -> ``[B, C, size[0], size[1]]`` uint8 (rounded). The same function with
    ``B = 1`` serves images of different sizes.
    """
    B, C, H, W = x.shape
    oh, ow = size
    dev = x.device
    y0, y1, fy = _axis_coords(top, height, oh, dev)  # [B, oh]
    x0, x1, fx = _axis_coords(left, width, ow, dev)  # [B, ow]
    if flip is not None:
        f = h2d(flip, dev).view(B, 1).bool()
        x0, x1, fx = (torch.where(f, t.flip(1), t) for t in (x0, x1, fx))
    xf = x.float()
    if H * W <= MATMUL_MAX_PIXELS:
        wy = _tap_matrix(y0, y1, fy, H).unsqueeze(1)  # [B, 1, oh, H]
        wx = _tap_matrix(x0, x1, fx, W).transpose(1, 2).unsqueeze(1)  # [B, 1, W, ow]
        out = torch.matmul(torch.matmul(wy, xf), wx)
    else:
        r0 = torch.gather(xf, 2, y0.view(B, 1, oh, 1).expand(B, C, oh, W))
        r1 = torch.gather(xf, 2, y1.view(B, 1, oh, 1).expand(B, C, oh, W))
        rows = r0 + (r1 - r0) * fy.view(B, 1, oh, 1)
        c0 = torch.gather(rows, 3, x0.view(B, 1, 1, ow).expand(B, C, oh, ow))
        c1 = torch.gather(rows, 3, x1.view(B, 1, 1, ow).expand(B, C, oh, ow))
        out = c0 + (c1 - c0) * fx.view(B, 1, 1, ow)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``uint8 [B, C, H, W] -> float32 (x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).float().to(x.device).view(1, -1, 1, 1)
    bias = (-m / s).float().to(x.device).view(1, -1, 1, 1)
    return torch.addcmul(bias, x.float(), scale)


def cutout(x: Tensor, cy: Tensor, cx: Tensor, length: int, value: int = 0) -> Tensor:
    """Set the ``length x length`` square centred at ``(cy, cx)`` (clipped to the image) to
    ``value`` in each image (Cutout, one hole)."""
    B, _, H, W = x.shape
    dev = x.device
    half = length // 2
    ys = torch.arange(H, device=dev).view(1, H)
    xs = torch.arange(W, device=dev).view(1, W)
    cy = h2d(cy, dev).view(B, 1).long()
    cx = h2d(cx, dev).view(B, 1).long()
    in_y = (ys >= cy - half) & (ys < cy - half + length)
    in_x = (xs >= cx - half) & (xs < cx - half + length)
    hole = (in_y.view(B, 1, H, 1) & in_x.view(B, 1, 1, W))
    return x.masked_fill(hole, value)


# ------------------------------------------------------------------------ photometric (uint8 -> uint8)
def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """``factor * a + (1 - factor) * b``, clamped and rounded to uint8; ``factor`` is ``[B]``."""
    f = h2d(factor, a.device).float().view(-1, 1, 1, 1)
    out = b.float() + f * (a.float() - b.float())
    return out.round_().clamp_(0, 255).to(torch.uint8)


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma ``[B, 3, H, W] -> [B, 1, H, W]`` uint8 (rounded)."""
    xf = x.float()
    g = 0.299 * xf[:, 0:1] + 0.587 * xf[:, 1:2] + 0.114 * xf[:, 2:3]
    return g.round_().clamp_(0, 255).to(torch.uint8)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def color(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x).expand_as(x), factor)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).float().mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), factor)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with a 3x3 smoothing (centre weight 5, others 1, /13) of the interior pixels."""
    B, C, H, W = x.shape
    if H < 3 or W < 3:
        return x
    k = torch.ones(3, 3, device=x.device, dtype=torch.float32)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(C, 1, 3, 3)
    smooth = torch.nn.functional.conv2d(x.float(), k, groups=C).round_().clamp_(0, 255)
    blurred = x.clone()
    blurred[:, :, 1:-1, 1:-1] = smooth.to(torch.uint8)
    return _blend(x, blurred, factor)


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits[b]`` (1..8) bits of every channel value."""
    shift = (8 - h2d(bits, x.device).long().clamp(0, 8)).view(-1, 1, 1, 1)
    mask = ((255 >> shift) << shift).to(torch.uint8)
    return x & mask


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Invert every value ``>= threshold[b]``."""
    t = h2d(threshold, x.device).float().view(-1, 1, 1, 1)
    return torch.where(x.float() >= t, 255 - x, x)


def solarize_add(x: Tensor, addition: Tensor, threshold: int = 128) -> Tensor:
    """Add ``addition[b]`` to values below ``threshold`` (clamped to 255)."""
    a = h2d(addition, x.device).float().view(-1, 1, 1, 1)
    added = (x.float() + a).clamp_(0, 255).to(torch.uint8)
    return torch.where(x < threshold, added, x)


def invert(x: Tensor) -> Tensor:
    return 255 - x


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel of each image so its min maps to 0 and its max to 255."""
    xf = x.float()
    lo = xf.amin(dim=(2, 3), keepdim=True)
    hi = xf.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = torch.where(flat, torch.ones_like(hi), 255.0 / (hi - lo).clamp_min(1e-6))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((xf - lo) * scale).round_().clamp_(0, 255).to(torch.uint8)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation per image and channel (PIL's ``ImageOps.equalize`` rule).

    One scatter-add builds all ``B*C`` histograms; the look-up table of each is
    ``(cumulative count below v + step // 2) // step`` with ``step = (N - count of the largest
    value) // 255``; channels with ``step == 0`` are left unchanged.
    """
    B, C, H, W = x.shape
    flat = x.reshape(B * C, H * W).long()
    hist = torch.zeros(B * C, 256, device=x.device, dtype=torch.long)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    present = hist > 0
    last = 255 - torch.flip(present, dims=[1]).long().argmax(dim=1, keepdim=True)
    step = (H * W - hist.gather(1, last)) // 255  # [BC, 1]
    below = torch.cumsum(hist, dim=1) - hist
    lut = ((below + step // 2) // step.clamp_min(1)).clamp_(0, 255)
    identity = torch.arange(256, device=x.device).view(1, 256).expand_as(lut)
    lut = torch.where(step == 0, identity, lut)
    return lut.gather(1, flat).to(torch.uint8).view(B, C, H, W)
