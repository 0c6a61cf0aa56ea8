"""KeyedLoader: exact, pixel-free spaced replay for any map-style ``Dataset`` and its transforms.

Notes for users of this module (the trainer, examples, README):

- ``KeyedLoader(dataset, batch_size, shuffle, drop_last, num_workers, pin_memory,
  persistent_workers, prefetch_factor, collate_fn, seed, rank, world_size)`` takes the
  ``DataLoader`` arguments users know; ``batch_size`` is the GLOBAL batch.
- It is a replayable source with streams (:mod:`spacedkd_fast.data.protocol`): pass it as
  ``source=`` to ``SpacedDistiller`` / ``SelfDistiller`` and train with
  ``for key, (x, y) in loader.epoch(e): d.step(key, x, y)`` (``len(loader)`` is
  ``steps_per_epoch``; plain ``for key, (x, y) in loader`` walks the next epoch, as
  ``DataLoader`` does with a ``DistributedSampler``'s ``set_epoch``).
- Every ``dataset[i]`` runs with torch's (CPU), numpy's and Python's ``random`` global generators
  seeded from ``(seed, stream, key, position in the global batch)`` (:func:`.keyed.sample_seeds`),
  in whichever process loads it; ``collate_fn`` runs seeded too (a CutMix in the collate
  replays). So ``batch(key)`` is bit-identical to what ``epoch`` yielded, with 0, 1 or N workers,
  after a resume (``epoch(e, start=i)``) and under torchrun (rank ``r`` loads only rows
  ``r::world_size`` of each global batch, seeded by their global position).
- With ``num_workers=0`` the caller's generator states are saved before and restored after each
  batch: loading never moves the training loop's random state (dropout draws stay the user's).
- What cannot replay: randomness that does not go through those three global generators (a
  transform's own ``np.random.Generator`` / ``random.Random`` / ``torch.Generator``, CUDA
  generators, wall-clock or file-order dependence). The engine's checksum stops such a run at its
  first replay with a ``ReplayMismatchError`` that names the key, this cause and ``CopyReplay``
  (``source=None``: the engine keeps copies of the batches instead) as the fallback.
- Replays stream through a worker pool with prefetch (:meth:`KeyedLoader.batches`, asked for the
  whole run of keys of one replay by the engine), at the speed of a first pass; the engine keeps
  only a key and a checksum per batch.
- ``collate_fn`` must return what the engine takes: ``(x, y)`` tensors. A Hugging Face
  ``datasets.Dataset`` after ``with_transform`` gives dicts: pass a ``collate_fn`` that builds
  ``(x, y)`` from them.

- A source that wraps a KeyedLoader and forwards attributes (``__getattr__``, e.g. the
  trainer's ``ChannelsLastSource``) must define ``batches(keys)`` itself (its transform applied
  to each of ``inner.batches(keys)``): without it the engine asks ``batch(key)`` one at a time in
  the training process (correct, but without the worker pool's prefetch).
- Use ``persistent_workers=True`` for a spaced run: a replay's run starts its pool's workers
  otherwise (as every epoch of a ``DataLoader`` does). ``close()`` (or a ``with`` block) stops
  them when you are done: left to the garbage collector, torch stalls 5 s per worker.
- ``epoch`` / ``batch`` with ``num_workers=0`` load in the calling thread and seed the
  process-wide generators: call them from the training thread, not a background one.

Two pools of workers can exist (one for epochs, one for replays, since a replay happens in the
middle of an epoch); ``persistent_workers`` applies to both. ``stream(s)`` gives one view per
stream, built at the first call and kept (with its pools) for every later call.
"""

from __future__ import annotations

import copy
import random
import weakref
from collections.abc import Callable, Iterable, Iterator
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate, get_worker_info

from .keyed import batch_sample_seeds, check_stream, epoch_permutation, step_locate
from .sources import KeyedIndexer
from .user_sets import BadDataError

# the collate of a batch is seeded like a sample at this position (past any real one), per rank
_COLLATE_POSITION = 1 << 40


def _seed_globals(seeds: tuple[int, int, int]) -> None:
    """Seed torch's CPU generator (not CUDA's: a replay in the training process must not move
    the caller's CUDA state), numpy's legacy global generator and Python's ``random``."""
    torch.random.default_generator.manual_seed(seeds[0])
    np.random.seed(seeds[1])
    random.seed(seeds[2])


class _SavedGlobals:
    """Saves the three global generator states on entry and puts them back on exit."""

    def __enter__(self):
        self.state = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
        return self

    def __exit__(self, *exc) -> None:
        t, n, p = self.state
        torch.random.set_rng_state(t)
        np.random.set_state(n)
        random.setstate(p)


class _BatchMaker:
    """Turns a key into this rank's collated batch, loading each sample with seeded globals.

    It is what ``DataLoader`` workers run: a "dataset" whose ``__getitems__`` takes one
    ``(stream, key)`` plan entry (what the batch sampler yields) and returns ``(key, batch)``;
    it holds no loader state, so it pickles small where workers are spawned.
    """

    def __init__(self, dataset, indexer: KeyedIndexer, shuffle: bool, seed: int,
                 collate_fn: Callable[[list], Any]):
        self.dataset = dataset
        self.indexer = indexer
        self.shuffle = shuffle
        self.seed = seed
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return self.indexer.num_samples

    def rows(self, stream: int, key: int) -> tuple[list[int], list[int]]:
        """``(positions in the global batch, sample indices)`` of this rank's rows of ``key``."""
        ix = self.indexer
        e, i = step_locate(key, ix.steps_per_epoch)
        lo = i * ix.batch_size
        hi = min(lo + ix.batch_size, ix.num_samples)
        positions = list(range(lo, hi))[ix.rank::ix.world_size]
        if self.shuffle:
            perm = epoch_permutation(self.seed, e, ix.num_samples, stream)
            indices = perm[lo:hi][ix.rank::ix.world_size].tolist()
        else:
            indices = positions
        return [p - lo for p in positions], indices

    def make(self, stream: int, key: int):
        positions, indices = self.rows(stream, key)
        seeds = batch_sample_seeds(self.seed, stream, key,
                                   [*positions, _COLLATE_POSITION + self.indexer.rank])
        samples = []
        for s, idx in zip(seeds, indices):
            _seed_globals(s)
            samples.append(self.dataset[idx])
        _seed_globals(seeds[-1])
        return self.collate_fn(samples)

    def __getitems__(self, plan: tuple[int, int]):
        stream, key = plan
        if get_worker_info() is None:  # in the caller's process: leave its generators as they were
            with _SavedGlobals():
                return key, self.make(stream, key)
        return key, self.make(stream, key)  # a worker's generators are its own

    def __getitem__(self, plan):  # DataLoader calls __getitems__ (a batch sampler is given)
        return self.__getitems__(plan)


def pair_collate(items: list) -> Any:
    """``default_collate`` of tuple / list / dict items (``(image, label)`` gives the engine's
    ``(x, y)``); a bare item (an image without its label, the usual slip) is one line naming the
    fix, not an unpacking error in the user's loop."""
    for item in items:
        if not isinstance(item, (tuple, list, dict)):
            raise BadDataError(f"KeyedLoader: a Dataset item must be an (image, label) pair, got "
                               f"{type(item).__name__}; return (image, label) from __getitem__ "
                               "or pass a collate_fn that builds (images, labels) batches")
    return default_collate(items)


def _passthrough(item):
    return item  # the batch maker collates already (seeded); DataLoader must not touch it


class _Plan:
    """A batch sampler whose list of ``(stream, key)`` entries is set before each iteration
    (read once per ``iter``, so an earlier iterator keeps its own plan)."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(list(self.entries))

    def __len__(self) -> int:
        return len(self.entries)


class _Pool:
    """One ``DataLoader`` (so one set of workers when ``persistent_workers``) for one purpose.

    A second concurrent run (an epoch started inside another of the same stream) gets a one-off
    loader instead of resetting the first one's persistent workers.
    """

    def __init__(self, make: Callable[[_Plan, bool], DataLoader]):
        # the loader's method, held weakly: a loader nobody holds is freed (and its workers
        # stopped) at once, not at the next garbage collection of a loader <-> pool cycle
        self._make_ref = weakref.WeakMethod(make)
        self._plan = _Plan()
        self._loader: DataLoader | None = None
        self._busy = False

    def run(self, stream: int, keys: Iterable[int]) -> Iterator[tuple[int, Any]]:
        entries = [(stream, int(k)) for k in keys]
        if not entries:
            return
        if self._busy:
            plan = _Plan()
            plan.entries = entries
            yield from _checked(self._make_ref()(plan, False), entries)
            return
        if self._loader is None:
            self._loader = self._make_ref()(self._plan, True)
        self._plan.entries = entries
        self._busy = True
        try:
            yield from _checked(self._loader, entries)
        finally:
            self._busy = False

    def close(self) -> None:
        """Stop this pool's persistent workers now; its next run starts new ones."""
        loader, self._loader = self._loader, None
        batches = getattr(loader, "_iterator", None)
        if batches is not None:
            _stop_workers(loader, batches)


def _checked(loader: DataLoader, entries: list[tuple[int, int]]) -> Iterator[tuple[int, Any]]:
    batches = iter(loader)
    try:
        for (_, want), (key, batch) in zip(entries, batches):
            if key != want:  # DataLoader keeps sampler order; a different key would be our bug
                raise RuntimeError(f"KeyedLoader: batch for key {key} arrived where {want} was due")
            yield key, batch
    except Exception:
        _stop_workers(loader, batches)
        raise


def _stop_workers(loader: DataLoader, batches: Iterator) -> None:
    """Stop the workers of ``loader``'s iterator ``batches`` now.

    Used where the iterator could otherwise be freed by the garbage collector: after a worker's
    error (the re-raised error's traceback holds the iterator in a reference cycle) and at
    :meth:`KeyedLoader.close`. Freed that way, torch's iterator finds its queues already torn
    down and waits 5 s per worker for workers that never hear the stop (a 10 s stall of a
    2-worker loader at some later collection).
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # what the iterator's __del__ calls
    if shutdown is not None:
        shutdown()
    if getattr(loader, "_iterator", None) is batches:  # persistent workers: start afresh next time
        loader._iterator = None


class KeyedLoader:
    """A ``DataLoader`` for any map-style ``dataset`` whose batches can be replayed by key.

    See the module docstring for what is seeded, workers, torchrun and what cannot replay.
    ``rank`` / ``world_size``: default from ``torch.distributed`` when it is initialised, else
    0 / 1. ``seed``: the run's data seed (epoch orders and every sample's random draws).
    ``prefetch_factor``: batches each worker loads ahead (``DataLoader``'s default when ``None``).
    """

    def __init__(self, dataset, batch_size: int = 1, shuffle: bool = True, drop_last: bool = False,
                 num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                 prefetch_factor: int | None = None, collate_fn: Callable[[list], Any] | None = None,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1 (the global batch; a keyed batch "
                             f"cannot be switched off as DataLoader's None does), got {batch_size!r}")
        if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers needs num_workers > 0 (as DataLoader)")
        if prefetch_factor is not None and num_workers == 0:
            raise ValueError("prefetch_factor needs num_workers > 0 (as DataLoader)")
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if on else 0) if rank is None else rank
            world_size = (dist.get_world_size() if on else 1) if world_size is None else world_size
        try:
            n = len(dataset)
        except TypeError:
            raise TypeError(f"KeyedLoader needs a map-style dataset with __len__ and __getitem__, "
                            f"got {type(dataset).__name__}") from None
        self.dataset = dataset
        self.indexer = KeyedIndexer(n, batch_size, seed=seed, drop_last=drop_last, rank=rank,
                                    world_size=world_size)
        tail = n % self.indexer.batch_size
        if not drop_last and 0 < tail < self.indexer.world_size:
            raise ValueError(f"the last batch of each epoch holds {tail} sample(s), fewer than "
                             f"world_size {self.indexer.world_size}: a rank would get an empty "
                             "batch; use drop_last=True or another batch_size")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.prefetch_factor = prefetch_factor
        self.collate_fn = collate_fn if collate_fn is not None else pair_collate
        self._maker = _BatchMaker(dataset, self.indexer, self.shuffle, self.seed, self.collate_fn)
        self._next_epoch = 0
        self._new_pools()
        self._no_views()

    def _no_views(self) -> None:
        # the views of other streams, built once (stream id -> view); a view refers back to the
        # loader that built it weakly, so no reference cycle keeps worker pools alive past use
        self._views: dict[int, KeyedLoader] = {}
        self._root: weakref.ref | None = None

    def _new_pools(self) -> None:
        self._epoch_pool = _Pool(self._data_loader)
        self._replay_pool = _Pool(self._data_loader)

    def _data_loader(self, plan: _Plan, keep: bool) -> DataLoader:
        # its own generator: DataLoader draws each iterator's base seed from the global one
        # otherwise, which would move the caller's torch random state
        return DataLoader(self._maker, batch_sampler=plan, num_workers=self.num_workers,
                          collate_fn=_passthrough, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers and keep,
                          prefetch_factor=self.prefetch_factor,
                          generator=torch.Generator().manual_seed(self.seed))

    # -- the key scheme -----------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """``L``: batches per epoch (the last partial batch counts unless ``drop_last``)."""
        return self.indexer.steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    @property
    def num_samples(self) -> int:
        return self.indexer.num_samples

    @property
    def seed(self) -> int:
        return self.indexer.seed

    @property
    def rank(self) -> int:
        return self.indexer.rank

    @property
    def world_size(self) -> int:
        return self.indexer.world_size

    @property
    def stream_id(self) -> int:
        """The data stream this loader draws (0: the training stream)."""
        return self.indexer.stream

    def key(self, epoch: int, i: int) -> int:
        """The key of batch ``i`` of ``epoch``."""
        return self.indexer.key(epoch, i)

    def locate(self, key: int) -> tuple[int, int]:
        """``key -> (epoch, i)``; ``InvalidKeyError`` for a key that is not an int >= 1."""
        return self.indexer.locate(key)

    def keys(self, epoch: int, start: int = 0) -> range:
        """The keys of ``epoch`` from batch ``start`` on, in training order."""
        return self.indexer.keys(epoch, start)

    def stream(self, stream: int) -> KeyedLoader:
        """The same data as data stream ``stream``: its own epoch orders and sample seeds, the
        same key scheme; ``stream(0)`` is the training stream. The view has its own workers,
        built once: every later ``stream(s)`` (of this loader or of any of its views) is the same
        view, so a caller asking for it at each use (the engine's ``replay="fresh"`` catch-ups)
        keeps its persistent workers instead of starting new ones each time."""
        stream = check_stream(stream)
        if stream == self.stream_id:
            return self
        root = self._root() if self._root is not None else None
        owner = self if root is None else root  # the loader whose views these are
        if stream == owner.stream_id:
            return owner
        view = owner._views.get(stream)
        if view is None:
            view = copy.copy(owner)  # no pools, no views (__getstate__ / __setstate__)
            view.indexer = owner.indexer.with_stream(stream)
            view._maker = _BatchMaker(owner.dataset, view.indexer, owner.shuffle, owner.seed,
                                      owner.collate_fn)
            view._new_pools()
            view._root = weakref.ref(owner)
            owner._views[stream] = view
        return view

    # -- batches ------------------------------------------------------------------------------
    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        """Yield ``(key, (x, y))`` for batches ``start .. L-1`` of ``epoch`` (0-based), loaded by
        the workers; ``start > 0`` resumes an epoch with the batches an uninterrupted one yields."""
        keys = self.keys(epoch, start)
        yield from self._epoch_pool.run(self.stream_id, keys)

    def batch(self, key: int):
        """Batch ``key`` again, loaded in this process: bit-identical to what ``epoch`` gave."""
        self.locate(key)
        return self._maker.__getitems__((self.stream_id, int(key)))[1]

    def batches(self, keys: Iterable[int]) -> Iterator[Any]:
        """The batches of ``keys`` in order (each equal to ``batch(key)``), loaded ahead by the
        workers: the engine asks for one replay's run of keys at once."""
        keys = list(keys)
        for k in keys:
            self.locate(k)
        for _, b in self._replay_pool.run(self.stream_id, keys):
            yield b

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next ``iter(loader)`` walks (then the one after, and so on)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._next_epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        e, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return self.epoch(e)

    def close(self) -> None:
        """Stop the persistent workers of this loader and of its stream views now, rather than
        whenever the garbage collector frees them (see :func:`_stop_workers`). The loader stays
        usable: its next epoch or replay starts new workers. ``with KeyedLoader(...) as loader:``
        closes it at the end of the block; the trainer closes its loaders at the end of a run."""
        self._epoch_pool.close()
        self._replay_pool.close()
        for view in self._views.values():
            view.close()

    def __enter__(self) -> KeyedLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self):  # workers spawned by a user's own code get no pools
        state = self.__dict__.copy()
        state.pop("_epoch_pool", None)
        state.pop("_replay_pool", None)
        state.pop("_views", None)
        state.pop("_root", None)
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._new_pools()
        self._no_views()
