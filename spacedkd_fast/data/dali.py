"""DALI sources: pipelines fed with the keyed parameters through ``external_source``.

The pipeline does the geometric stage (crop with padding + flip + nearest rotation, or
random-resized crop + flip, and JPEG decoding for folders: ``decoders.image`` on the ``mixed``
device when a GPU is used); every random number comes from :class:`Augmenter.draw` on the host
and enters as an ``external_source`` input, so replaying a key is exact. The photometric tail
(policies, Cutout, normalisation, erasing) runs as batched torch ops on DALI's output, the same
code as the torch backends.

Agreement with the torch backends for the same key (measured by ``tests/data/test_data_dali.py``):
crop, padding and flip give identical pixels, so whole batches are bit-identical for the
``tiny``, ``cifar-selfkd`` and ``none`` recipes. Nearest rotation: source points that fall
exactly on a pixel edge may round the other way (measured 0 differing pixels on the test batches;
tolerance 2 %). Bilinear resizing (random-resized crop, test resize): DALI slices the box and
resizes it, as torch does; results differ by at most 1 grey level on about 0.1-0.2 % of pixels
(float rounding of the blend; tolerance: max 1, under 1 %). Random-erasing noise comes from the
output device's generator, so it matches the torch backend on the same device only.

Two ways of running: ``batch(key)`` feeds one batch to a non-pipelined pipeline and runs it;
``epoch(e)`` streams through ``DALIGenericIterator`` over a second pipeline whose
``external_source`` callback produces the inputs of key ``first_key + iteration``, so DALI
prefetches and overlaps batches. Both give the same tensors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from . import imageops
from .augment import Augmenter
from .datasets import ArrayData, FileData
from .sources import KeyedIndexer, _SourceBase

Batch = tuple[Tensor, Tensor]


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


class DaliSource(_SourceBase):
    """A replayable source whose geometric stage (and JPEG decoding) runs in DALI.

    ``data``: :class:`ArrayData` (images fed from host memory) or :class:`FileData` (encoded files
    fed as bytes and decoded by DALI). ``device``: ``"cpu"`` runs DALI in CPU mode
    (``device_id=None``); ``"cuda[:i]"`` runs it on that GPU (decoding on the ``mixed`` device).
    """

    def __init__(self, data: ArrayData | FileData, augmenter: Augmenter, *, batch_size: int = 128,
                 seed: int = 0, device: str | torch.device = "cpu", drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, num_threads: int = 2, prefetch: int = 2):
        if not dali_available():
            raise ImportError("the DALI backend needs nvidia-dali (pip install nvidia-dali-cuda130)")
        r = augmenter.recipe
        if r.resample != "bilinear" or r.test_resample != "bilinear":
            raise ValueError(f"recipe {r.name!r} resamples as PIL does ({r.resample}, test "
                             f"{r.test_resample}), which DALI cannot; use backend 'gpu' or 'cpu'")
        self.data = data
        self.augmenter = augmenter
        self.device = torch.device(device)
        self.files = isinstance(data, FileData)
        self.indexer = KeyedIndexer(len(data), batch_size, seed=seed, drop_last=drop_last, rank=rank,
                                    world_size=world_size)
        self.labels = torch.from_numpy(np.asarray(data.labels, np.int64))
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.max_rows = len(range(rank, batch_size, world_size))
        self.backend = "dali-gpu" if self.device.type == "cuda" else "dali-cpu"
        self._pipe = None
        self._lock = threading.Lock()
        self._sizes: dict[int, tuple[int, int]] = {}
        self._inputs = ["images", *self._param_names()]

    # ---------------------------------------------------------------------------- pipeline
    def _param_names(self) -> list[str]:
        r = self.augmenter.recipe
        if r.random_resized_crop or self.files:
            names = ["roi_start", "roi_end"]
        else:
            names = []
        if not r.random_resized_crop and r.crop_padding is not None:
            names.append("anchor")
        names.append("flip")
        if not r.random_resized_crop and r.rotate_degrees:
            names.append("angle")
        return names

    def _device_id(self):
        return None if self.device.type == "cpu" else (self.device.index or 0)

    def _graph(self, inputs):
        """The DALI graph on ``inputs`` (name -> DataNode); returns uint8 HWC images."""
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types

        a = self.augmenter
        r = a.recipe
        gpu = self.device.type == "cuda"
        oh, ow = a.out_size
        img = inputs["images"]
        if self.files:
            img = fn.decoders.image(img, device="mixed" if gpu else "cpu", output_type=types.RGB)
        elif gpu:
            img = img.gpu()
        if "roi_start" in inputs:
            # Random-resized crop, or (crop recipes on files) the whole image to the output size.
            # Slice the box first, then resize: the bilinear filter then clamps at the box edge
            # like torchvision's crop-then-resize (a resize ROI would read pixels outside it).
            box = fn.slice(img, inputs["roi_start"], inputs["roi_end"] - inputs["roi_start"],
                           axis_names="HW", normalized_anchor=False, normalized_shape=False)
            img = fn.resize(box, size=[oh, ow], interp_type=types.INTERP_LINEAR, antialias=False)
        if "anchor" in inputs:
            img = fn.slice(img, inputs["anchor"], np.array([ow, oh], np.int32), axis_names="WH",
                           out_of_bounds_policy="pad", fill_values=float(r.crop_fill))
        img = fn.flip(img, horizontal=inputs["flip"])
        if "angle" in inputs:
            img = fn.rotate(img, angle=inputs["angle"], interp_type=types.INTERP_NN, fill_value=0,
                            keep_size=True)
        return img

    def _build_random_access(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.max_rows, num_threads=self.num_threads,
                      device_id=self._device_id(), exec_async=False, exec_pipelined=False,
                      prefetch_queue_depth=1)
        def pipe():
            inputs = {}
            for name in self._inputs:
                if name == "images":
                    inputs[name] = fn.external_source(name=name, dtype=types.UINT8,
                                                      layout=None if self.files else "HWC")
                else:
                    inputs[name] = fn.external_source(name=name)
            return self._graph(inputs)

        p = pipe()
        p.build()
        return p

    # ------------------------------------------------------------------------------ inputs
    def _image_size(self, i: int) -> tuple[int, int]:
        if i not in self._sizes:
            from PIL import Image

            with Image.open(self.data.paths[i]) as im:
                w, h = im.size
            self._sizes[i] = (h, w)
        return self._sizes[i]

    def _host_inputs(self, idx: Tensor, p: dict | None) -> dict[str, list[np.ndarray]]:
        """Per-sample numpy inputs for the pipeline (``p=None``: evaluation boxes)."""
        a = self.augmenter
        r = a.recipe
        n = len(idx)
        rows = idx.tolist()
        out: dict[str, list[np.ndarray]] = {}
        if self.files:
            out["images"] = [np.fromfile(self.data.paths[i], dtype=np.uint8) for i in rows]
            sizes = torch.tensor([self._image_size(i) for i in rows], dtype=torch.long).view(n, 2)
        else:
            imgs = self.data.images
            out["images"] = [imgs[i] for i in rows]
            sizes = torch.tensor([imgs.shape[1], imgs.shape[2]]).repeat(n, 1)
        hs, ws = sizes[:, 0], sizes[:, 1]
        if "roi_start" in self._inputs:
            if p is None:
                top, left, h, w = a.test_boxes(hs, ws)
            elif r.random_resized_crop:
                top, left, h, w = a.boxes(p, hs, ws)
            else:
                top, left, h, w = torch.zeros_like(hs), torch.zeros_like(ws), hs, ws
            start = torch.stack([top, left], 1).float().numpy()
            end = torch.stack([top + h, left + w], 1).float().numpy()
            out["roi_start"] = list(start)
            out["roi_end"] = list(end)
        if "anchor" in self._inputs:
            if p is None:
                anchor = np.zeros((n, 2), np.int32)
            else:
                top, left = a.crop_offsets(p)
                anchor = torch.stack([left, top], 1).int().numpy()  # (W, H) order of axis_names
            out["anchor"] = list(anchor)
        flip = p["flip"].int().numpy() if (p is not None and "flip" in p) else np.zeros(n, np.int32)
        out["flip"] = [np.array(v, np.int32) for v in flip]
        if "angle" in self._inputs:
            ang = p["angle"].float().numpy() if p is not None else np.zeros(n, np.float32)
            out["angle"] = [np.array(v, np.float32) for v in ang]
        return out

    def _to_torch(self, tl) -> Tensor:
        """DALI TensorList (uint8 HWC, uniform shape) -> torch ``uint8 [B, C, H, W]``."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = tl.as_tensor()
        out = torch.empty(t.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(t, out, cuda_stream=stream)
        return out.permute(0, 3, 1, 2)

    def _run(self, inputs: dict[str, list[np.ndarray]]) -> Tensor:
        with self._lock:
            if self._pipe is None:
                self._pipe = self._build_random_access()
            for name, value in inputs.items():
                self._pipe.feed_input(name, value)
            (out,) = self._pipe.run()
            return self._to_torch(out)

    # ------------------------------------------------------------------------------ batches
    def _finish(self, x: Tensor, p: dict) -> Tensor:
        a = self.augmenter
        return a.finish(a.photometric(x.contiguous(), p), p)

    def uint8_batch(self, key: int) -> tuple[Tensor, dict]:
        """The DALI stage only (``uint8 [b, 3, S, S]``) and the parameters."""
        idx, p = self.params(key)
        return self._run(self._host_inputs(idx, p)), p

    def _produce(self, key: int):
        idx, p = self.params(key)
        x = self._run(self._host_inputs(idx, p))
        return self._finish(x, p), self.labels[idx].to(self.device)

    def batches(self, keys) -> Iterator[Batch]:
        """The batches of ``keys`` in order, through the random-access pipeline in the calling
        thread (the pipeline is not to be driven from the base class's look-ahead thread while
        ``batch(key)`` may use it); the GPU work is queued asynchronously anyway."""
        for k in keys:
            yield self.batch(k)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """Stream batches ``start .. L-1`` of ``epoch`` through ``DALIGenericIterator`` (DALI
        prefetches the next batches)."""
        keys = list(self.keys(epoch, start))
        if not keys:
            return
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        params: dict[int, tuple[Tensor, dict]] = {}
        names = self._inputs

        def feed(info):  # called by DALI with the iteration number, possibly ahead of use
            if info.iteration >= len(keys):
                raise StopIteration
            k = keys[info.iteration]
            params[k] = self.params(k)
            inputs = self._host_inputs(*params[k])
            return tuple(inputs[n] for n in names)

        @pipeline_def(batch_size=self.max_rows, num_threads=self.num_threads,
                      device_id=self._device_id(), prefetch_queue_depth=max(1, self.prefetch))
        def pipe():
            nodes = fn.external_source(source=feed, num_outputs=len(names), batch=True,
                                       batch_info=True, parallel=False,
                                       dtype=[types.UINT8] + [None] * (len(names) - 1))
            return self._graph(dict(zip(names, nodes)))

        p = pipe()
        p.build()
        it = DALIGenericIterator([p], ["x"], auto_reset=False)
        for i, out in enumerate(it):
            k = keys[i]
            x = out[0]["x"].to(self.device).permute(0, 3, 1, 2)
            idx, prm = params.pop(k)
            yield k, (self._finish(x, prm), self.labels[idx].to(self.device))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Unaugmented, normalised batches in data order (this rank's share), through DALI."""
        a = self.augmenter
        n = len(self.data)
        step = self.max_rows * self.indexer.world_size
        for s in range(0, n, step):
            idx = torch.arange(s, min(n, s + step))[self.indexer.rank::self.indexer.world_size]
            x = self._run(self._host_inputs(idx, None))
            yield imageops.normalize(x.contiguous(), a.mean, a.std), self.labels[idx].to(self.device)
