"""Replayable batch sources (``spacedkd_fast.engine.source_protocol.ReplayableSource``).

Keys are global steps ``n >= 1`` (``key(epoch, i)``; ``locate(n)`` inverts it; the formula lives
in :mod:`.keyed` only). From ``(seed, stream, epoch)`` comes the epoch's sample order, from
``(seed, stream, n)`` every augmentation parameter, so ``batch(n)`` regenerates a batch
bit-identically at any time. ``epoch(e, start=i)`` resumes an epoch at batch ``i``;
``stream(s)`` is the same data with independent permutations and augmentation (the official ViT
loop's second loader). The protocol is written out in :mod:`spacedkd_fast.data.protocol`.

Distributed: ``batch_size`` is the *global* batch; rank ``r`` of ``world_size`` takes rows
``r::world_size`` of every global batch, with the parameters those rows have in the global batch.

- :class:`TensorSource`: data held as ``uint8 [N, C, H, W]`` on ``device`` (GPU-resident on CUDA,
  the plain torch path on CPU); gather + batched augmentation, no per-sample Python.
- :class:`FileSource`: image files decoded per batch in a thread pool (``FileData``); each image
  is cropped/resized on its own (sizes differ), the rest of the recipe runs batched.
- DALI sources live in ``spacedkd_fast.data.dali``.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from . import imageops
from .augment import Augmenter
from .datasets import ArrayData, FileData, decode_image
from .keyed import check_stream, epoch_permutation, step_key, step_locate

Batch = tuple[Tensor, Tensor]


class KeyedIndexer:
    """Keys -> sample indices: epoch permutations keyed by ``(seed, stream, epoch)``, batches of
    ``batch_size`` (the last partial batch kept unless ``drop_last``), rank slices."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, stream: int = 0):
        if num_samples <= 0:
            raise ValueError("the data set is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size < world_size:
            raise ValueError(f"global batch_size {batch_size} is smaller than world_size {world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.stream = check_stream(stream)
        full, rest = divmod(self.num_samples, self.batch_size)
        self.steps_per_epoch = full if (drop_last or rest == 0) else full + 1
        if self.steps_per_epoch == 0:
            raise ValueError(f"drop_last with batch_size {batch_size} > {num_samples} samples gives no batch")

    def locate(self, key: int) -> tuple[int, int]:
        """``key -> (epoch, index within the epoch)``."""
        return step_locate(key, self.steps_per_epoch)

    def key(self, epoch: int, i: int) -> int:
        """The key of batch ``i`` of ``epoch``."""
        return step_key(epoch, i, self.steps_per_epoch)

    def keys(self, epoch: int, start: int = 0) -> range:
        """The keys of batches ``start ..`` of ``epoch``, in training order (every source's
        ``keys``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        L = self.steps_per_epoch
        if not 0 <= start <= L:
            raise ValueError(f"start must be in [0, {L}] (batches per epoch), got {start}")
        return range(self.key(epoch, start), self.key(epoch + 1, 0))

    def with_stream(self, stream: int) -> KeyedIndexer:
        """This indexer on data stream ``stream`` (its own epoch permutations)."""
        out = copy.copy(self)
        out.stream = check_stream(stream)
        return out

    def global_indices(self, key: int) -> Tensor:
        """Sample indices of the whole (global) batch ``key``: CPU int64 ``[B]``."""
        epoch, i = self.locate(key)
        perm = epoch_permutation(self.seed, epoch, self.num_samples, self.stream)
        return perm[i * self.batch_size:(i + 1) * self.batch_size]

    def rank_rows(self, global_batch: int) -> Tensor:
        """Rows of a global batch that belong to this rank."""
        return torch.arange(self.rank, global_batch, self.world_size)


class _SourceBase:
    """Epoch iteration with a one-batch look-ahead thread, shared by the concrete sources."""

    indexer: KeyedIndexer
    augmenter: Augmenter
    prefetch: int | None = 1  # batches made ahead in a thread; None: auto (see _lookahead)

    @property
    def steps_per_epoch(self) -> int:
        return self.indexer.steps_per_epoch

    @property
    def num_samples(self) -> int:
        return self.indexer.num_samples

    @property
    def seed(self) -> int:
        return self.indexer.seed

    @property
    def stream_id(self) -> int:
        """The data stream this source draws (0: the training stream)."""
        return self.indexer.stream

    _copier: _DeviceCopier | None = None

    def _produce(self, key: int):  # pragma: no cover - abstract
        """Make batch ``key`` (any thread); returns what :meth:`_ready` turns into ``(x, y)``."""
        raise NotImplementedError

    def _ready(self, item) -> Batch:
        """In the consuming thread: order its CUDA stream after the batch's host-to-device copy."""
        return self._copier.ready(item) if self._copier is not None else item

    def batch(self, key: int) -> Batch:
        """The batch ``key`` (bit-identical every time): ``(x float32 [b, 3, S, S], y int64 [b])``."""
        return self._ready(self._produce(key))

    def params(self, key: int) -> tuple[Tensor, dict]:
        """``(indices, parameters)`` of this rank's share of batch ``key`` (CPU tensors)."""
        from .augment import select_rows

        idx = self.indexer.global_indices(key)
        p = self.augmenter.draw(key, len(idx), self.indexer.stream)
        if self.indexer.world_size > 1:
            rows = self.indexer.rank_rows(len(idx))
            idx, p = idx[rows], select_rows(p, rows)
        return idx, p

    def batches(self, keys) -> Iterator[Batch]:
        """The batches of ``keys`` in order, each equal to ``batch(key)``, made ahead by the
        look-ahead thread as ``epoch`` does (a replay's run of keys)."""
        keys = list(keys)
        depth = self._lookahead()
        if depth <= 0:
            for k in keys:
                yield self.batch(k)
            return
        for _, item in _prefetched(keys, self._produce, depth):
            yield self._ready(item)

    def key(self, epoch: int, i: int) -> int:
        """The key of batch ``i`` of ``epoch``."""
        return self.indexer.key(epoch, i)

    def locate(self, key: int) -> tuple[int, int]:
        """``key -> (epoch, i)``; ``InvalidKeyError`` (a ``ValueError`` and a ``KeyError``) for a
        key that is not an int >= 1."""
        return self.indexer.locate(key)

    def keys(self, epoch: int, start: int = 0) -> range:
        """The keys of ``epoch`` from batch ``start`` on, in training order."""
        return self.indexer.keys(epoch, start)

    def stream(self, stream: int):
        """The same data as data stream ``stream``: independent epoch permutations and
        augmentation draws, the same key scheme; ``stream(0)`` is the training stream.

        The view shares this source's data, device buffers and worker pools.
        """
        stream = check_stream(stream)
        if stream == self.stream_id:
            return self
        view = copy.copy(self)
        view.indexer = self.indexer.with_stream(stream)
        return view

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """Yield ``(key, (x, y))`` for batches ``start .. L-1`` of ``epoch`` (0-based) in training
        order; ``start > 0`` resumes an epoch with the batches an uninterrupted epoch yields.

        With a look-ahead (``prefetch > 0``, or auto: :meth:`_lookahead`) a worker thread
        prepares the next batches while the caller trains (torch ops release the GIL); the values
        are those of ``batch(key)`` either way.
        """
        keys = self.keys(epoch, start)
        depth = self._lookahead()
        if depth <= 0:
            for k in keys:
                yield k, self.batch(k)
            return
        for k, item in _prefetched(keys, self._produce, depth):
            yield k, self._ready(item)

    def _lookahead(self) -> int:
        """How many batches the look-ahead thread makes ahead for this epoch (0: no thread).

        ``prefetch=None`` (auto) looks ahead only while torch runs one intra-op thread. With
        libgomp (torch's OpenMP), every thread that runs a parallel op gets a pool of its own;
        once a process has more pooled threads than cores, libgomp stops spinning between
        parallel regions in every pool, so each of the hundreds of small regions of a CPU
        training step waits for a sleeping worker to be woken (measured on 2 cores: the main
        thread's futex calls doubled and an online-KD epoch took 1.6x longer). Making a batch
        costs little next to a step (~2 ms of ~70 ms at 8 px), so with several intra-op
        threads the caller's thread makes it, with the caller's pool.
        """
        if self.prefetch is not None:
            return self.prefetch
        return 1 if torch.get_num_threads() == 1 else 0


class _DeviceCopier:
    """Host-to-device copies of finished CPU batches on a side CUDA stream.

    ``copy`` (any thread) pins the tensors and queues non-blocking copies on the copy stream, so
    they overlap the consumer's compute; ``ready`` (the consuming thread) makes the consumer's
    current stream wait for them and tells the caching allocator that the tensors are used there.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def copy(self, *tensors: Tensor):
        with torch.cuda.stream(self.stream):
            out = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def ready(self, item) -> Batch:
        tensors, event = item
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors:
            t.record_stream(current)
        return tensors


def _copier_for(device: torch.device) -> _DeviceCopier | None:
    return _DeviceCopier(device) if device.type == "cuda" else None


def _prefetched(keys, make, depth: int):
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for k in keys:
                if stop.is_set():
                    return
                q.put((k, make(k), None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put((None, None, exc))
            return
        q.put((None, None, None))

    t = threading.Thread(target=work, daemon=True, name="spacedkd-prefetch")
    t.start()
    try:
        while True:
            k, item, exc = q.get()
            if exc is not None:
                raise exc
            if k is None:
                return
            yield k, item
    finally:
        stop.set()
        while t.is_alive():  # drain so that the worker can finish its put
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


class TensorSource(_SourceBase):
    """Batches gathered from ``uint8`` images held on ``device`` and augmented with batched imageops.

    ``data``: an :class:`ArrayData` (``[N, H, W, 3]``); stored once as ``[N, 3, H, W]`` on
    ``device``. ``batch(key)`` -> ``(x float32 [b, 3, S, S], y int64 [b])`` on ``device``.
    ``out_device``: where batches are delivered when it differs from ``device`` (CPU augmentation
    for a CUDA consumer: pinned, non-blocking copies on a side stream, overlapping compute).
    """

    def __init__(self, data: ArrayData, augmenter: Augmenter, *, batch_size: int = 128, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, prefetch: int | None = None,
                 out_device: str | torch.device | None = None):
        self.device = torch.device(device)
        self.out_device = torch.device(out_device) if out_device is not None else self.device
        self.augmenter = augmenter
        self.indexer = KeyedIndexer(len(data), batch_size, seed=seed, drop_last=drop_last, rank=rank,
                                    world_size=world_size)
        self.images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = torch.from_numpy(data.labels).to(self.device)
        # On a GPU the augmentation is queued asynchronously: no look-ahead thread is needed. On
        # a CPU, None (auto) decides at each epoch (_lookahead).
        self.prefetch = 0 if self.device.type == "cuda" and prefetch is None else prefetch
        self.backend = "gpu-resident" if self.device.type == "cuda" else "torch-cpu"
        if self.out_device != self.device:  # CPU augmentation for a GPU consumer
            self._copier = _copier_for(self.out_device)

    def _produce(self, key: int):
        idx, p = self.params(key)
        idx_dev = imageops.h2d(idx, self.device)
        x, y = self.augmenter(self.images[idx_dev], p), self.labels[idx_dev]
        return self._copier.copy(x, y) if self._copier is not None else (x, y)

    def uint8_batch(self, key: int) -> tuple[Tensor, dict]:
        """The geometric stage only (``uint8``) and the parameters: for comparing backends."""
        idx, p = self.params(key)
        x = self.images.index_select(0, idx.to(self.device))
        return self.augmenter.geometric(x, p), p


class FileSource(_SourceBase):
    """Batches decoded from image files (``FileData``) in a thread pool, then augmented.

    Decoding and the size-dependent first stage (random-resized crop, or resize to the output
    size for crop recipes) run per image in the pool; flips, policies, normalisation and erasing
    run batched. An unreadable file raises :class:`UnreadableImageError` naming it.
    ``device``: where batches are delivered (copied from pinned memory, non-blocking).
    """

    def __init__(self, data: FileData, augmenter: Augmenter, *, batch_size: int = 128, seed: int = 0,
                 device: str | torch.device = "cpu", drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, workers: int | None = None, prefetch: int = 2):
        self.data = data
        self.augmenter = augmenter
        self.device = torch.device(device)
        self.indexer = KeyedIndexer(len(data), batch_size, seed=seed, drop_last=drop_last, rank=rank,
                                    world_size=world_size)
        self.labels = torch.from_numpy(data.labels)
        self.prefetch = prefetch
        self._pool = ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 1))
        self.backend = "torch-cpu"
        self._copier = _copier_for(self.device)

    def _first_stage(self, path: str, row: int, p: dict, train: bool) -> Tensor:
        img = torch.from_numpy(decode_image(path)).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W]
        a = self.augmenter
        H, W = img.shape[2:]
        hs, ws = torch.tensor([H]), torch.tensor([W])
        if not train:
            box = a.test_boxes(hs, ws)
        elif a.recipe.random_resized_crop:
            box = a.boxes({"rrc": p["rrc"][row:row + 1]}, hs, ws)
        else:
            box = (torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), hs, ws)
        if (H, W) == a.out_size and all(int(b) == v for b, v in zip(box, (0, 0, H, W))):
            return img[0]
        return a.resize(img, *box, test=not train)[0]

    def _decode_batch(self, idx: Tensor, p: dict | None, train: bool) -> Tensor:
        paths = [self.data.paths[i] for i in idx.tolist()]
        imgs = list(self._pool.map(lambda a: self._first_stage(a[1], a[0], p, train), enumerate(paths)))
        return torch.stack(imgs)

    def _produce(self, key: int):
        idx, p = self.params(key)
        x = self._decode_batch(idx, p, train=True)
        a = self.augmenter
        if a.recipe.random_resized_crop:
            if "flip" in p:
                x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
        else:
            x = a.geometric(x, p)  # already at the output size: crop/flip/rotate
        x, y = a.finish(a.photometric(x, p), p), self.labels[idx]
        return self._copier.copy(x, y) if self._copier is not None else (x, y)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Unaugmented, normalised batches in file order (this rank's share)."""
        n = len(self.data)
        for s in range(0, n, batch_size):
            idx = torch.arange(s, min(n, s + batch_size))
            if self.indexer.world_size > 1:
                idx = idx[self.indexer.rank::self.indexer.world_size]
            x = imageops.normalize(self._decode_batch(idx, None, train=False), self.augmenter.mean,
                              self.augmenter.std)
            yield self._ready(self._copier.copy(x, self.labels[idx])) if self._copier else (x, self.labels[idx])


def tensor_eval_batches(images: Tensor, labels: Tensor, augmenter: Augmenter, batch_size: int, *,
                        rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
    """Unaugmented, normalised batches of device-held ``uint8 [N, 3, H, W]`` images."""
    n = images.shape[0]
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))[rank::world_size].to(images.device)
        yield augmenter.test_transform(images.index_select(0, idx)), labels.index_select(0, idx)
