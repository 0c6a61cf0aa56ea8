"""KeyedLoader against a plain ``DataLoader``: the same data set, transform, batch and workers.

Providers per group (one epoch of ``N`` images per round, 2 workers, persistent; batches of 128
at 32 px, 32 at 224 px so that both workers have batches in a small epoch):
``plain DataLoader (2 workers)`` (baseline), ``KeyedLoader first pass`` (``epoch(e)``: every
sample seeded) and ``KeyedLoader replay pass`` (``batches(keys)``: the engine's replay path, the
epoch's keys in reverse order). Targets (issue 18): first pass >= 0.95x, replay >= 0.9x.

Because the machine may be shared, ``test_keyed_loader_interleaved`` also times the providers
round-robin (A B C A B C ...) in one loop and prints the ratio of medians. It also times the
replay as the engine ran it before ``batches(keys)``: ``batch(key)`` one at a time in the
training process (what a source without ``batches`` still gets). With ``SPACEDKD_BENCH_FULL=1``,
``test_own_pipeline_interleaved`` times the package's own batched CPU pipeline (``TensorSource``,
``torch-cpu batched``) at 224 px for the ``vit`` and ``vit-official`` recipes against the
torchvision ``DataLoader`` of the same recipe, in a table of its own: its look-ahead thread and
intra-op threads share this process with whatever else runs in it (``test_bench_data.py`` times
it too).
The quick grid (the default) times the 224 px cases only interleaved, on 128 images.

Data and transforms are those of ``test_bench_data.py`` (digits upscaled through PIL; the
recipe's torchvision / timm transform per sample).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
from test_bench_data import PilDataset, subset, torchvision_transform
from torch.utils.data import DataLoader

from spacedkd_fast.data import Augmenter, KeyedLoader, TensorSource
from spacedkd_fast.data.augment import IMAGENET_MEAN, IMAGENET_STD, get_recipe
from spacedkd_fast.data.datasets import load_digits_split
from spacedkd_fast.data.torchvision_recipes import train_transform

QUICK = os.environ.get("SPACEDKD_BENCH_QUICK", "0") not in ("", "0")
WORKERS = 2
PLAIN = f"plain DataLoader ({WORKERS} workers)"
CASES = [("cifar", 32, 1024), ("vit", 224, 256), ("vit-official", 224, 256)]


def _batch(size: int) -> int:
    return 128 if size <= 32 else 32

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


def _n(n: int) -> int:
    return n // 2 if QUICK else n  # 224 px: 128 images in the quick grid


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("train")


def _dataset(digits, recipe, size, n):
    return PilDataset(subset(digits, _n(n)), torchvision_transform(recipe, size))


def _skip_in_quick(size: int) -> None:
    if QUICK and size > 32:
        pytest.skip("quick run: 224 px is timed by the interleaved test only")


def _plain(dataset, size) -> DataLoader:
    return DataLoader(dataset, batch_size=_batch(size), shuffle=True, num_workers=WORKERS,
                      persistent_workers=True)


def _providers(dataset, size, one_by_one: bool = False):
    """name -> a function that runs one epoch (each keeps its own epoch counter)."""
    plain = _plain(dataset, size)
    keyed = KeyedLoader(dataset, batch_size=_batch(size), shuffle=True, num_workers=WORKERS,
                        persistent_workers=True, seed=0)
    state = {"first": 0, "replay": 0, "single": 0}

    def run_plain():
        for _ in plain:
            pass

    def run_first():
        for _ in keyed.epoch(state["first"]):
            pass
        state["first"] += 1

    def run_replay():
        keys = list(keyed.keys(state["replay"]))[::-1]
        for _ in keyed.batches(keys):
            pass
        state["replay"] += 1

    out = {PLAIN: run_plain, "KeyedLoader first pass": run_first,
           "KeyedLoader replay pass": run_replay}
    if one_by_one:
        def run_one_by_one():  # what the engine's replay did before batches(keys)
            for k in list(keyed.keys(state["single"]))[::-1]:
                keyed.batch(k)
            state["single"] += 1

        out["replay by batch(key), in this process"] = run_one_by_one
    return out


def _own_providers(dataset, recipe, size):
    """The torchvision DataLoader, the package's own batched CPU pipeline and its ``torchvision``
    backend (the recipe as :mod:`spacedkd_fast.data.torchvision_recipes` builds it, in a
    KeyedLoader with the same workers), same recipe."""
    plain = _plain(dataset, size)
    src = TensorSource(dataset.data, Augmenter(recipe, size, seed=0), batch_size=_batch(size),
                       seed=0)
    backend = KeyedLoader(PilDataset(dataset.data, train_transform(get_recipe(recipe), size,
                                                                   IMAGENET_MEAN, IMAGENET_STD)),
                          batch_size=_batch(size), shuffle=True, num_workers=WORKERS,
                          persistent_workers=True, seed=0)
    state = {"own": 0, "backend": 0}

    def run_plain():
        for _ in plain:
            pass

    def run_own():
        for _ in src.epoch(state["own"]):
            pass
        state["own"] += 1

    def run_backend():
        for _ in backend.epoch(state["backend"]):
            pass
        state["backend"] += 1

    return {PLAIN: run_plain, "torch-cpu batched (TensorSource)": run_own,
            "torchvision backend (KeyedLoader)": run_backend}


def _interleaved(runs, title: str, images: int, capsys) -> None:
    """Times ``runs`` round-robin after one warm-up round each and prints the ratio table."""
    rounds = 3 if QUICK else 7
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up: worker start, first-epoch caches
        fn()
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}  # less moved by other processes' load
    with capsys.disabled():
        print(f"\n[{title}, interleaved, {rounds} rounds, {images} images/round; ratio to the "
              "plain DataLoader: median / best round]")
        for name, m in med.items():
            print(f"    {name:<38} {m * 1e3:9.1f} ms  {images / m:8.0f} img/s  "
                  f"{med[PLAIN] / m:5.2f}x  {best[PLAIN] / best[name]:5.2f}x")
    assert all(m > 0 for m in med.values())


@pytest.mark.parametrize("recipe,size,n", CASES)
@pytest.mark.parametrize("provider", ["plain", "first", "replay"])
def test_keyed_loader(bench, digits, recipe, size, n, provider):
    _skip_in_quick(size)
    dataset = _dataset(digits, recipe, size, n)
    runs = list(_providers(dataset, size).items())
    name, fn = runs[["plain", "first", "replay"].index(provider)]
    bench(fn, group=f"keyed loader {recipe} {size}px", provider=name, baseline=provider == "plain",
          note=f"{len(dataset)} images/round")


@pytest.mark.parametrize("recipe,size,n", CASES)
def test_keyed_loader_interleaved(digits, recipe, size, n, capsys):
    dataset = _dataset(digits, recipe, size, n)
    runs = _providers(dataset, size, one_by_one=size <= 32 or not QUICK)  # slow at 224 px
    _interleaved(runs, f"keyed loader {recipe} {size}px", len(dataset), capsys)


@pytest.mark.parametrize("recipe,size,n", CASES[1:])
def test_own_pipeline_interleaved(digits, recipe, size, n, capsys):
    if QUICK:
        pytest.skip("quick run: test_bench_data.py times the own pipelines at 224 px")
    dataset = _dataset(digits, recipe, size, n)
    _interleaved(_own_providers(dataset, recipe, size), f"own pipeline {recipe} {size}px",
                 len(dataset), capsys)
