"""Precomputed teacher feature maps (``--teacher-features precomputed``): a memory-mapped cache
of the frozen teacher's per-sample block outputs, and the crop and flip that follow each image.

The official ``deit-ti_c100_ours_offline`` config (OFFICIAL_VIT_FACTS.md section 1.1, OFFLINE)
never runs its ResNet-56 teacher: the teacher's maps were computed once per training image,
un-augmented, at the teacher's size. Each time an image is drawn, its maps get the image's own
random-resized-crop box and horizontal flip, and are resized back to their own ``h x w``.
RandAugment and random erasing touch the image only.

On disk (one folder per cache):

- ``block<k>.npy``: ``[N, C_k, h_k, w_k]`` (``float32`` or ``float16``), row ``i`` the maps of
  training sample ``i``; opened memory-mapped, so only the rows of a batch are read.
- ``manifest.json``, written last (a folder without one is an unfinished build): the format,
  what the maps were computed from (:class:`CacheSpec`: the teacher checkpoint and its SHA-256,
  the blocks, the teacher's input size and normalisation, the data set and the SHA-256 of its
  training images), the shapes and dtype, and a SHA-256 of each block file.

How a map follows its image (:func:`crop_maps`): a box ``(top, left, h, w)`` in image pixels of an
``H x W`` image covers ``[top * h_k / H, (top + h) * h_k / H)`` rows of a map with ``h_k`` rows
(columns alike): the same part of the picture. Each output row ``i`` of ``h_k`` samples that span
at ``top_m + (i + 0.5) * h_m / h_k - 0.5`` map pixels (the pixel-centre rule of bilinear resizing
with ``align_corners=False``, no antialiasing), clamped to the map, linearly between its two
neighbours; then the row is mirrored where the image was flipped. The whole image as the box is
the identity. The work is two small matrix products per map (:func:`box_matrix`).

No model runs here (the builder that runs the teacher is ``spacedkd_fast.train.cache_features``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .imageops import h2d

FORMAT = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16")


class StaleCacheError(ValueError):
    """A cache that does not belong to this run (another teacher, data set, blocks, ...), or that
    is damaged; the message is one line naming what differs."""


@dataclass(frozen=True)
class CacheSpec:
    """What a cache was computed from; a run opens a cache only if every field matches."""

    teacher_checkpoint: str  # the file's path as given (informative: the checksum decides)
    teacher_sha256: str
    teacher_arch: str
    blocks: tuple[int, ...]
    teacher_image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    num_samples: int
    image_size: tuple[int, int]  # (H, W) of the stored training images (crop boxes are in these)
    data_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> CacheSpec:
        out = {}
        for f in fields(cls):
            v = values[f.name]
            out[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**out)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def images_sha256(images: Tensor) -> str:
    """SHA-256 of ``uint8`` images (any device), with their shape."""
    a = np.ascontiguousarray(images.detach().cpu().numpy())
    h = hashlib.sha256(repr(tuple(a.shape)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def block_file(block: int) -> str:
    return f"block{int(block)}.npy"


# --------------------------------------------------------------------------- writing
class CacheWriter:
    """Writes a cache folder: rows in any order through :meth:`write`, then :meth:`finish`.

    An existing manifest is removed first, so an interrupted rebuild never looks complete.
    """

    def __init__(self, folder: str | os.PathLike, spec: CacheSpec,
                 shapes: Sequence[tuple[int, int, int]], dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
        if len(shapes) != len(spec.blocks):
            raise ValueError(f"{len(shapes)} map shapes for {len(spec.blocks)} blocks")
        self.folder, self.spec, self.dtype = Path(folder), spec, dtype
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)
        self.arrays = [np.lib.format.open_memmap(self.folder / block_file(b), mode="w+",
                                                 dtype=dtype, shape=(spec.num_samples, *s))
                       for b, s in zip(spec.blocks, self.shapes)]
        self.written = np.zeros(spec.num_samples, dtype=bool)

    def write(self, rows: Tensor | np.ndarray, maps: Sequence[Tensor]) -> None:
        """Store ``maps[k][j]`` (``[B, C_k, h_k, w_k]``) as sample ``rows[j]`` of block ``k``."""
        rows = np.asarray(torch.as_tensor(rows).cpu(), dtype=np.int64)
        for arr, m, shape in zip(self.arrays, maps, self.shapes, strict=True):
            if tuple(m.shape[1:]) != shape:
                raise ValueError(f"maps of shape {tuple(m.shape[1:])}, cache holds {shape}")
            arr[rows] = m.detach().float().cpu().numpy().astype(self.dtype)
        self.written[rows] = True

    def finish(self) -> Path:
        """Flush the maps, checksum them and write the manifest; returns the folder."""
        if not self.written.all():
            raise ValueError(f"{int((~self.written).sum())} of {self.spec.num_samples} samples "
                             "have no maps")
        for arr in self.arrays:
            arr.flush()
        digests = [file_sha256(self.folder / block_file(b)) for b in self.spec.blocks]
        del self.arrays
        manifest = {"format": FORMAT, "spec": self.spec.to_json(), "dtype": self.dtype,
                    "shapes": [list(s) for s in self.shapes], "sha256": digests}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, self.folder / MANIFEST)
        return self.folder


# --------------------------------------------------------------------------- reading
class FeatureCache:
    """An opened cache: ``spec``, ``shapes``, ``dtype`` and the memory-mapped blocks.

    :meth:`open` raises ``FileNotFoundError`` when the folder has no manifest (never built, or
    the build did not finish) and :class:`StaleCacheError` when it is damaged.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.spec = CacheSpec.from_json(manifest["spec"])
        self.dtype = manifest["dtype"]
        self.shapes = [tuple(s) for s in manifest["shapes"]]
        self.arrays = []
        for b, shape in zip(self.spec.blocks, self.shapes):
            path = folder / block_file(b)
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise StaleCacheError(f"feature cache {folder}: cannot read {path.name} "
                                      f"({type(err).__name__}); rebuild it") from None
            if arr.shape != (self.spec.num_samples, *shape) or str(arr.dtype) != self.dtype:
                raise StaleCacheError(f"feature cache {folder}: {path.name} holds "
                                      f"{arr.dtype} {arr.shape}, its manifest says {self.dtype} "
                                      f"{(self.spec.num_samples, *shape)}; rebuild it")
            self.arrays.append(arr)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> FeatureCache:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no feature cache in {folder} (no {MANIFEST})")
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != FORMAT:
                raise StaleCacheError(f"feature cache {folder}: format {manifest.get('format')}, "
                                      f"this version reads {FORMAT}; rebuild it")
            return cls(folder, manifest)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise StaleCacheError(f"feature cache {folder}: unreadable {MANIFEST} "
                                  f"({type(err).__name__}); rebuild it") from None

    def mismatches(self, want: CacheSpec) -> list[str]:
        """``"field: cache X, this run Y"`` for each field of ``want`` that differs."""
        out = []
        for f in fields(CacheSpec):
            have, need = getattr(self.spec, f.name), getattr(want, f.name)
            if f.name == "teacher_checkpoint" or have == need:
                continue
            if f.name.endswith("sha256"):
                have, need = have[:12], need[:12]
            out.append(f"{f.name}: cache {have}, this run {need}")
        return out

    def check(self, want: CacheSpec) -> None:
        """:class:`StaleCacheError` (one line) unless the cache was computed from ``want``."""
        diff = self.mismatches(want)
        if diff:
            extra = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            raise StaleCacheError(f"feature cache {self.folder} is stale: {diff[0]}{extra}")

    def verify_files(self) -> list[str]:
        """Names of the block files whose SHA-256 differs from the manifest's (reads them all)."""
        return [block_file(b) for b, digest in zip(self.spec.blocks, self.manifest["sha256"])
                if file_sha256(self.folder / block_file(b)) != digest]

    def gather(self, indices: Tensor) -> list[Tensor]:
        """The stored maps of samples ``indices`` (CPU int64 ``[B]``): ``float32 [B, C, h, w]``
        per block, on the CPU. Rows are read in file order (memory-map friendly)."""
        idx = indices.detach().cpu().long().numpy()
        order = np.argsort(idx, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        out = []
        for arr in self.arrays:
            rows = np.asarray(arr[idx[order]])[back]
            out.append(torch.from_numpy(rows.astype(np.float32, copy=False)))
        return out


# --------------------------------------------------------------------------- crop and flip
def box_matrix(start: Tensor, extent: Tensor, image_len: int, map_len: int) -> Tensor:
    """Bilinear weights that resample the span of image pixels ``[start, start + extent)`` of an
    axis of ``image_len`` pixels, on a map axis of ``map_len`` pixels covering the same image,
    back to ``map_len`` samples: float64 ``[B, map_len (out), map_len (in)]`` on the CPU.

    Output ``i`` sits at ``(start + (i + 0.5) * extent / map_len) * map_len / image_len - 0.5``
    map pixels (half-pixel centres), clamped to ``[0, map_len - 1]``.
    """
    start = start.detach().cpu().double().view(-1, 1)
    extent = extent.detach().cpu().double().view(-1, 1)
    f = map_len / image_len
    i = torch.arange(map_len, dtype=torch.float64).view(1, -1)
    src = (start * f + (i + 0.5) * (extent * f / map_len) - 0.5).clamp(0, map_len - 1)
    lo = src.floor()
    lam = src - lo
    lo = lo.long()
    hi = (lo + 1).clamp(max=map_len - 1)
    w = torch.zeros(src.shape[0], map_len, map_len, dtype=torch.float64)
    w.scatter_add_(2, lo.unsqueeze(2), (1 - lam).unsqueeze(2))
    w.scatter_add_(2, hi.unsqueeze(2), lam.unsqueeze(2))
    return w


def crop_maps(maps: Sequence[Tensor], top: Tensor, left: Tensor, height: Tensor, width: Tensor,
              flip: Tensor | None, image_size: tuple[int, int]) -> list[Tensor]:
    """Each map ``[B, C, h, w]`` cropped to its sample's box (image pixels of an ``image_size``
    image), resized back to ``h x w`` and mirrored where ``flip`` (see the module docstring).
    Computed in the maps' dtype on their device."""
    H, W = image_size
    out = []
    for m in maps:
        B, _, h, w = m.shape
        wy = box_matrix(top, height, H, h)  # [B, h, h]
        wx = box_matrix(left, width, W, w)  # [B, w, w]
        if flip is not None:
            f = flip.detach().cpu().bool().view(B, 1, 1)
            wx = torch.where(f, wx.flip(1), wx)
        wy = h2d(wy.to(m.dtype), m.device).unsqueeze(1)  # [B, 1, h, h]
        wxt = h2d(wx.to(m.dtype), m.device).transpose(1, 2).unsqueeze(1)  # [B, 1, w, w]
        out.append(torch.matmul(torch.matmul(wy, m), wxt))
    return out


# --------------------------------------------------------------------------- the source
class MapsSource:
    """A replayable source (iterates ``inner``) whose batches come with the teacher maps of their
    samples, cropped and flipped like the images.

    ``keyed``: the data source that draws the batches (``params(key)`` gives its samples and
    augmentation parameters, ``augmenter.crop_geometry`` their boxes and flips); ``inner`` is it
    or a wrapper of it (e.g. channels_last) yielding the same batches. The maps of the batch last
    yielded (by :meth:`epoch` or :meth:`batch`) are :meth:`maps_for` that batch's images; a
    teacher stand-in reads them there instead of running the teacher.
    """

    def __init__(self, inner: Any, keyed: Any, cache: FeatureCache) -> None:
        self.inner, self.keyed, self.cache = inner, keyed, cache
        self.steps_per_epoch = inner.steps_per_epoch
        self._held: tuple[int, Tensor, Future | None] | None = None
        # fail at build time, not at the first step, for a recipe with no crop-box geometry
        keyed.augmenter.check_crop_geometry()

    def __getattr__(self, name: str) -> Any:  # what the inner source has (num_samples, ...)
        if name == "inner":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _hold(self, key: int, batch, raw: Future | None = None) -> None:
        self._held = (int(key), batch[0], raw)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        """The inner source's epoch; the stored maps of the next batch are read from the memory
        map in a worker thread while the current one trains (the crop runs at the step)."""
        keys = list(self.keyed.keys(epoch, start))
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spacedkd-maps") as pool:
            ahead: dict[int, Future] = {}

            def ask(i: int) -> None:
                if i < len(keys):
                    ahead[keys[i]] = pool.submit(self._raw, keys[i])

            ask(0)
            for i, (key, batch) in enumerate(self.inner.epoch(epoch, start=start)):
                ask(i + 1)
                self._hold(key, batch, ahead.pop(int(key), None))
                yield key, batch

    def batch(self, key: int):
        out = self.inner.batch(key)
        self._hold(key, out)
        return out

    def stream(self, s: int) -> MapsSource:
        """The inner source's stream ``s``, with its own maps."""
        return MapsSource(self.inner.stream(s), self.keyed.stream(s), self.cache)

    def _raw(self, key: int) -> tuple[Tensor, dict, list[Tensor]]:
        """``(indices, parameters, stored maps)`` of batch ``key`` (this rank's rows; CPU)."""
        idx, p = self.keyed.params(key)
        return idx, p, self.cache.gather(idx)

    def maps_of_key(self, key: int, device: torch.device | str = "cpu",
                    raw: tuple[Tensor, dict, list[Tensor]] | None = None) -> list[Tensor]:
        """The augmented maps of batch ``key`` (this rank's rows), ``float32`` on ``device``
        (``raw``: what :meth:`_raw` read for it, if already read)."""
        idx, p, stored = raw if raw is not None else self._raw(key)
        H, W = self.cache.spec.image_size
        n = len(idx)
        top, left, h, w, flip = self.keyed.augmenter.crop_geometry(
            p, torch.full((n,), H), torch.full((n,), W))
        maps = [h2d(m, torch.device(device)) for m in stored]
        return crop_maps(maps, top, left, h, w, flip, (H, W))

    def maps_for(self, x: Tensor) -> list[Tensor]:
        """The maps of the batch whose images are ``x`` (the batch this source yielded last);
        ``RuntimeError`` for any other tensor, so maps never pair with the wrong images."""
        held = self._held
        if held is None or not _same_tensor(held[1], x):
            raise RuntimeError("precomputed teacher maps: the teacher was asked about a batch "
                               "that is not the one the source yielded last")
        key, _, raw = held
        return self.maps_of_key(key, x.device, raw.result() if raw is not None else None)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.device == b.device and a.shape == b.shape and a.stride() == b.stride()
                      and a.data_ptr() == b.data_ptr())
