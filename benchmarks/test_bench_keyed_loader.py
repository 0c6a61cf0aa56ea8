"""KeyedLoader against a plain ``DataLoader``: the same data set, transform, batch and workers.

Providers per group (one epoch of ``N`` images per round, 2 workers, persistent; batches of 128
at 32 px, 32 at 224 px so that both workers have batches in a small epoch):
``plain DataLoader (2 workers)`` (baseline), ``KeyedLoader first pass`` (``epoch(e)``: every
sample seeded) and ``KeyedLoader replay pass`` (``batches(keys)``: the engine's replay path, the
epoch's keys in reverse order). Targets (issue 18): first pass >= 0.95x, replay >= 0.9x.

Because the machine may be shared, ``test_keyed_loader_interleaved`` also times the providers
round-robin (A B C A B C ...) in one loop and prints the ratio of medians; with
``SPACEDKD_BENCH_FULL=1`` at 224 px it adds the package's own batched CPU pipeline
(``TensorSource``, ``torch-cpu batched``) for the ``vit`` and ``vit-official`` recipes, each
against the torchvision ``DataLoader`` of the same recipe (``test_bench_data.py`` times it too).
It also times the replay as the engine ran it before ``batches(keys)``: ``batch(key)`` one at a
time in the training process (what a source without ``batches`` still gets).
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
from spacedkd_fast.data.datasets import load_digits_split

QUICK = os.environ.get("SPACEDKD_BENCH_QUICK", "0") not in ("", "0")
WORKERS = 2
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


def _providers(dataset, recipe, size, with_own: bool, interleaved: bool = False):
    """name -> a function that runs one epoch (each keeps its own epoch counter)."""
    batch = _batch(size)
    plain = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=WORKERS,
                       persistent_workers=True)
    keyed = KeyedLoader(dataset, batch_size=batch, shuffle=True, num_workers=WORKERS,
                        persistent_workers=True, seed=0)
    state = {"first": 0, "replay": 0, "own": 0, "single": 0}

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

    out = {f"plain DataLoader ({WORKERS} workers)": run_plain,
           "KeyedLoader first pass": run_first, "KeyedLoader replay pass": run_replay}
    if interleaved:
        def run_one_by_one():  # what the engine's replay did before batches(keys)
            for k in list(keyed.keys(state["single"]))[::-1]:
                keyed.batch(k)
            state["single"] += 1

        out["replay by batch(key), in this process"] = run_one_by_one
    if with_own:
        data = dataset.data
        src = TensorSource(data, Augmenter(recipe, size, seed=0), batch_size=batch, seed=0)

        def run_own():
            for _ in src.epoch(state["own"]):
                pass
            state["own"] += 1

        out["torch-cpu batched (TensorSource)"] = run_own
    return out


@pytest.mark.parametrize("recipe,size,n", CASES)
@pytest.mark.parametrize("provider", ["plain", "first", "replay"])
def test_keyed_loader(bench, digits, recipe, size, n, provider):
    _skip_in_quick(size)
    dataset = _dataset(digits, recipe, size, n)
    runs = list(_providers(dataset, recipe, size, with_own=False).items())
    name, fn = runs[["plain", "first", "replay"].index(provider)]
    bench(fn, group=f"keyed loader {recipe} {size}px", provider=name, baseline=provider == "plain",
          note=f"{len(dataset)} images/round")


@pytest.mark.parametrize("recipe,size,n", CASES)
def test_keyed_loader_interleaved(digits, recipe, size, n, capsys):
    dataset = _dataset(digits, recipe, size, n)
    runs = _providers(dataset, recipe, size, with_own=size == 224 and not QUICK, interleaved=True)
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
    plain = f"plain DataLoader ({WORKERS} workers)"
    with capsys.disabled():
        print(f"\n[keyed loader {recipe} {size}px, interleaved, {rounds} rounds, "
              f"{len(dataset)} images/round; ratio to the plain DataLoader: median / best round]")
        for name, m in med.items():
            print(f"    {name:<36} {m * 1e3:9.1f} ms  {len(dataset) / m:8.0f} img/s  "
                  f"{med[plain] / m:5.2f}x  {best[plain] / best[name]:5.2f}x")
    assert all(m > 0 for m in med.values())
