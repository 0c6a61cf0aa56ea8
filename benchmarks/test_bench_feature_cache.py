"""Precomputed teacher maps (``deit-ti_c100_ours_offline``) against the same recipe with the
ResNet-56 teacher run on every batch (``--teacher-features live``, the official
``deit-ti_c100_ours``), both wired by the trainer (``build_run``):

- ``... teacher maps of one batch``: what differs between the two, alone: the frozen teacher's
  forward at 32 px (train mode, no grad: the official frozen teacher; baseline) against the
  batch's cached maps gathered from the memory map, cropped and flipped (``precomputed``);
- ``... step, interleaved``: whole training steps (one round = one epoch of the keyed source
  through the distiller, augmentation included, as the training loop runs them), one round of
  each alternately, since the machine may be shared; the note gives the per-step medians of each
  and their ratio, measured side by side.

CPU (quick grid): a CIFAR-100-shaped stand-in (random images, 32 px), the DeiT-Ti student at
32 px (a miniature: the official student runs at 224 px, where its own cost dwarfs the
teacher's), batch 16, 1 step per round. ``SPACEDKD_BENCH_FULL=1``: the student at 224 px.
CUDA (``-m cuda``): the official shape, 224 px, batch 128, 8 steps per round.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

QUICK = os.environ.get("SPACEDKD_BENCH_QUICK", "1") == "1"
RECIPE = "deit-ti_c100_ours_offline"


@dataclasses.dataclass(frozen=True)
class Workload:
    device: str
    size: int  # the student's image size
    batch: int
    steps: int  # per round

    @property
    def name(self) -> str:
        return f"{RECIPE}, {self.device}, student {self.size} px, batch {self.batch}"


CPU = Workload("cpu", 32 if QUICK else 224, 16, 1)
CUDA = Workload("cuda", 224, 128, 8)

_PARTS: dict = {}
_FOLDERS: list[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _cleanup():
    yield
    _PARTS.clear()
    for folder in _FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


def _parts(w: Workload, features: str):
    """``RunParts`` of the recipe at workload ``w`` (built once per process)."""
    key = (w, features)
    if key in _PARTS:
        return _PARTS[key]
    from spacedkd_fast.data import ArrayData, Augmenter, DataBundle, TensorSource
    from spacedkd_fast.models import create
    from spacedkd_fast.train.build import build_run
    from spacedkd_fast.train.checkpoint import BEST_NAME, save_best_student
    from spacedkd_fast.train.config import build_config, load_yaml
    from spacedkd_fast.train.distributed import init_distributed

    folder = Path(tempfile.mkdtemp(prefix="bench-maps-"))
    _FOLDERS.append(folder)
    ckpt = folder / BEST_NAME
    torch.manual_seed(0)
    save_best_student(folder, state_dict=create("resnet56", 100, 32).state_dict(),
                      arch="resnet56", num_classes=100, image_size=32, epoch=1, top1=0.0)
    n = w.batch * w.steps
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, n).astype(np.int64)
    source = TensorSource(ArrayData(images, labels, 100, "random CIFAR-100 shape"),
                          Augmenter("vit-official", w.size, seed=0), batch_size=w.batch, seed=0,
                          device=w.device, drop_last=True)
    data = DataBundle(train=source, test=lambda: [], num_classes=100, image_size=w.size,
                      name="random", backend=source.backend, announcement="")
    cfg = build_config(load_yaml(RECIPE), dict(
        image_size=w.size, batch_size=w.batch, epochs=1, warmup_epochs=0, device=w.device,
        teacher_checkpoint=str(ckpt), teacher_features=features, out=str(folder / "run")))
    parts = build_run(cfg, init_distributed(w.device), data=data)
    _PARTS[key] = parts
    return parts


def _round(parts, epoch: list[int]):
    """One epoch of the source through the distiller (the training loop's own order)."""
    for key, (x, y) in parts.source.epoch(epoch[0]):
        parts.distiller.step(key, x, y)
    epoch[0] += 1
    if parts.device.type == "cuda":
        torch.cuda.synchronize(parts.device)


def _maps_of_one_batch(bench, w: Workload, provider: str):
    live = provider == "live-teacher forward"
    parts = _parts(w, "live" if live else "precomputed")
    key, (x, _) = next(iter(parts.source.epoch(0)))
    teacher = parts.distiller.teacher  # what the engine calls for the teacher's maps
    if live:
        teacher.train()  # the official frozen teacher runs in train mode

        def fn():
            with torch.no_grad():
                maps, _ = teacher(x)
            if parts.device.type == "cuda":
                torch.cuda.synchronize(parts.device)
            return maps
    else:
        def fn():
            maps = parts.source.maps_of_key(key, x.device)
            if parts.device.type == "cuda":
                torch.cuda.synchronize(parts.device)
            return maps
    bench(fn, group=f"{w.name}: teacher maps of one batch", provider=provider,
          baseline=live, device=w.device, rounds=5 if QUICK else 30)


def _interleaved(bench, benchmark, w: Workload, pairs: int) -> None:
    live, pre = _parts(w, "live"), _parts(w, "precomputed")
    epochs = {id(live): [0], id(pre): [0]}
    times: dict[int, list[float]] = {id(live): [], id(pre): []}

    def pair():
        for parts in (live, pre):
            t0 = time.perf_counter()
            _round(parts, epochs[id(parts)])
            times[id(parts)].append(time.perf_counter() - t0)

    bench(pair, group=f"{w.name}: step, interleaved", provider="live + precomputed, alternating",
          device=w.device, rounds=pairs)
    # the first pair is the harness's warm-up round; the ratio is the median of each pair's own
    # ratio, so that a load that changes between pairs cancels out
    t_live, t_pre = (times[id(p)][1:] for p in (live, pre))
    ratios = sorted(a / b for a, b in zip(t_live, t_pre))
    benchmark.extra_info["note"] = (
        f"per step: live teacher {statistics.median(t_live) / w.steps * 1e3:.1f} ms, precomputed "
        f"{statistics.median(t_pre) / w.steps * 1e3:.1f} ms; live/precomputed per pair: median "
        f"{statistics.median(ratios):.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}, "
        f"{len(ratios)} pairs)")
    print(f"\n[{w.name}] {benchmark.extra_info['note']}")


MAPS_PROVIDERS = ["live-teacher forward", "precomputed"]


@pytest.mark.parametrize("provider", MAPS_PROVIDERS)
def test_bench_teacher_maps_of_one_batch_cpu(bench, provider):
    _maps_of_one_batch(bench, CPU, provider)


def test_bench_precomputed_maps_step_interleaved_cpu(bench, benchmark):
    _interleaved(bench, benchmark, CPU, pairs=6 if QUICK else 15)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", MAPS_PROVIDERS)
def test_bench_teacher_maps_of_one_batch_cuda(bench, provider):
    _maps_of_one_batch(bench, CUDA, provider)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_precomputed_maps_step_interleaved_cuda(bench, benchmark):
    _interleaved(bench, benchmark, CUDA, pairs=10)
