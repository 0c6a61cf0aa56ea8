"""End-to-end training throughput, one run, same machine, model and data:

- ``official-loop``: the re-creation of the official loop in ``benchmarks/official_loop.py``
  (per-sample torchvision transforms in a DataLoader, float32 pixel copies on the host for replay,
  unfused loss ops), spaced (baseline);
- ``ours-spaced``: ``SpacedDistiller`` over the keyed batched source, fused loss, same spacing;
- ``ours-online``: ``SpacedDistiller`` in online mode over the same source.

CPU groups: one round = one epoch of a slice of the digits set with the CIFAR augmentation
recipe (crop pad 4, flip, rotation 15; the official loop: the same torchvision transforms per
sample, ``num_workers=0``), batch 128, a ResNet-18 teacher and student:

- ``8 px``, the digits' native size, 1,024 images, narrowed 64x in FLOPs
  (``downsample_factor=64``): little compute per op, so what a loop costs around the ops shows;
- ``32 px`` (digits resized), 512 images, ``downsample_factor=16``: convolutions dominate.

Every provider runs with torch's default thread count (printed in each row's note) unless its
name says ``1 thread``; ``look-ahead thread`` is the data source's look-ahead forced on with
several threads (the default before issue 22: a second OpenMP pool; see
``spacedkd_fast.data.sources._SourceBase._lookahead``). Each row's note gives images/s, the
spread (min-max) over its rounds and, for the online rows, the spaced/online time ratio.
Targets (reported, not asserted): ours-spaced >= 1.5x the official loop's images/s; ours-spaced
within 20% of ours-online (spaced/online time <= 1.2); the default at least as fast as 1 thread.

CUDA group (``-m cuda``, skipped without a GPU): ResNet-18 teacher and student at CIFAR-100 shape
(32 px, 100 classes, random uint8 images since nothing is downloaded), 40 batches of 128 per round,
the official loop with 4 loader workers.

Spacing s = 1.0 puts exactly one replay in every epoch, so every timed round does the same work;
each batch is replayed once whatever s is, so the per-image cost of spaced KD does not depend on s.
State carries over between rounds, as in a real run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

INTERVAL_RATE = 1.0
BATCH = 128


@dataclasses.dataclass(frozen=True)
class Workload:
    device: str
    size: int
    num_classes: int
    n_images: int
    width: dict
    workers: int

    def images(self):
        if self.num_classes == 10:  # the digits' training split, first n images
            from spacedkd_fast.data import load_digits_split

            train = load_digits_split("train", image_size=self.size)
            return train.images[: self.n_images].copy(), train.labels[: self.n_images].copy()
        rng = np.random.default_rng(0)  # CIFAR-100-shaped stand-in: timing only
        images = rng.integers(0, 256, (self.n_images, self.size, self.size, 3), dtype=np.uint8)
        return images, rng.integers(0, self.num_classes, self.n_images).astype(np.int64)


# the digits' native size: with a small model and small images, compute does not hide what a
# training loop costs around it; at 32 px with a wider model, convolutions dominate
CPU = Workload("cpu", 8, 10, 1024, {"downsample_factor": 64}, 0)
CPU32 = Workload("cpu", 32, 10, 512, {"downsample_factor": 16}, 0)
CUDA = Workload("cuda", 32, 100, 40 * BATCH, {}, 4)


def _models(w: Workload):
    from spacedkd_fast.models import create

    torch.manual_seed(0)
    teacher = create("resnet18", w.num_classes, w.size, **w.width).to(w.device)
    student = create("resnet18", w.num_classes, w.size, **w.width).to(w.device)
    return teacher, student


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def official_round(w: Workload):
    from official_loop import OfficialLoop, official_loader

    from spacedkd_fast.engine.projection import ProjectionHead

    images, labels = w.images()
    teacher, student = _models(w)
    projector = ProjectionHead(student.feature_dim, teacher.feature_dim).to(w.device)
    steps = -(-w.n_images // BATCH)
    loop = OfficialLoop(teacher, student, projector, _sgd(teacher.parameters()),
                        _sgd(list(student.parameters()) + list(projector.parameters())),
                        interval=int(steps * INTERVAL_RATE), device=w.device)
    loader = official_loader(images, labels, batch_size=BATCH, num_workers=w.workers)
    return lambda: loop.epoch(loader)


def ours_round(w: Workload, mode: str, *, threads: int | None = None,
               prefetch: int | None = None):
    """``threads``: torch's thread count while the round runs (None: as it is); ``prefetch``:
    the source's look-ahead (None: its default)."""
    from spacedkd_fast.data import ArrayData, Augmenter, TensorSource
    from spacedkd_fast.data.augment import CIFAR100_MEAN, CIFAR100_STD
    from spacedkd_fast.engine.distill import SpacedDistiller
    from spacedkd_fast.ops.objective import KDLoss

    images, labels = w.images()
    classes = [str(i) for i in range(w.num_classes)]
    augmenter = Augmenter("cifar", w.size, seed=0, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    source = TensorSource(ArrayData(images, labels, classes, "benchmark slice"), augmenter,
                          batch_size=BATCH, seed=0, device=w.device, prefetch=prefetch)
    teacher, student = _models(w)
    distiller = SpacedDistiller(teacher, student, _sgd(teacher.parameters()),
                                _sgd(student.parameters()), mode=mode,
                                interval_rate=INTERVAL_RATE if mode == "spaced" else 0.0,
                                steps_per_epoch=source.steps_per_epoch,
                                loss=KDLoss(temperature=3.0, alpha=0.3, kd_scale=1.0), beta=0.03,
                                source=source)
    state = {"epoch": 0}

    def one_epoch():
        for key, (x, y) in source.epoch(state["epoch"]):
            distiller.step(key, x, y)
        distiller.pop_stats()  # the trainer reads the accumulators once per log interval
        state["epoch"] += 1
        if w.device != "cpu":
            torch.cuda.synchronize(w.device)

    if threads is None:
        return one_epoch

    def with_threads():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            one_epoch()
        finally:
            torch.set_num_threads(before)

    return with_threads


PROVIDERS = {
    "official-loop (spaced s=1)": (official_round, True),
    "ours-spaced (s=1)": (lambda w: ours_round(w, "spaced"), False),
    "ours-online": (lambda w: ours_round(w, "online"), False),
}
# CPU only: the same at 1 thread, and the look-ahead thread forced on (the cause of issue 22)
CPU_PROVIDERS = {
    **PROVIDERS,
    "ours-spaced (s=1), 1 thread": (lambda w: ours_round(w, "spaced", threads=1), False),
    "ours-online, 1 thread": (lambda w: ours_round(w, "online", threads=1), False),
    "ours-online, look-ahead thread": (lambda w: ours_round(w, "online", prefetch=1), False),
}
_MEDIANS: dict[tuple[str, str], float] = {}


def _group(w: Workload) -> str:
    net = "resnet18" + (f"/{w.width['downsample_factor']}" if w.width else "")
    return (f"train epoch: {net} x2, {w.n_images} imgs at {w.size} px, {w.num_classes} classes, "
            f"batch {BATCH}, {w.device}")


def _note(benchmark, w: Workload, provider: str, median: float) -> str:
    """images/s, the rounds' spread, the thread count; online rows: spaced/online time."""
    stats = benchmark.stats.stats
    threads = 1 if "1 thread" in provider else torch.get_num_threads()
    note = (f"{w.n_images / median:6.0f} img/s, rounds {stats.min * 1e3:.0f}-{stats.max * 1e3:.0f}"
            f" ms, {threads} thread{'s' if threads > 1 else ''}")
    if provider.startswith("ours-online") and "look-ahead" not in provider:
        spaced = _MEDIANS.get((_group(w), provider.replace("ours-online", "ours-spaced (s=1)")))
        if spaced is not None:
            note += f"; spaced/online time {spaced / median:.2f} (target <= 1.2)"
    return note


@pytest.mark.parametrize("w", [CPU, CPU32], ids=["8px", "32px"])
@pytest.mark.parametrize("provider", list(CPU_PROVIDERS))
def test_bench_train_epoch_cpu(bench, benchmark, provider, w):
    if torch.get_num_threads() == 1 and ("1 thread" in provider or "look-ahead" in provider):
        pytest.skip("torch runs one thread here: the default is the 1-thread row")
    if w is CPU32 and "look-ahead" in provider:
        pytest.skip("the look-ahead row is timed at 8 px only (it shows the cause; 32 px is slow)")
    make, baseline = CPU_PROVIDERS[provider]
    median = bench(make(w), group=_group(w), provider=provider, baseline=baseline, device="cpu",
                   images=w.n_images, threads=torch.get_num_threads())
    _MEDIANS[(_group(w), provider)] = median
    benchmark.extra_info["note"] = _note(benchmark, w, provider, median)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_bench_train_epoch_cuda(bench, provider):
    make, baseline = PROVIDERS[provider]
    bench(make(CUDA), group=_group(CUDA), provider=provider, baseline=baseline, device="cuda",
          images=CUDA.n_images, rounds=3, warmup=1)


def test_official_loop_objective_is_the_papers():
    """The baseline computes what the official code computes (probabilities into KLDivLoss)."""
    from official_loop import paper_code_loss

    s, t = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.randint(0, 10, (4,))
    p, q = torch.softmax(s / 3, 1), torch.softmax(t / 3, 1)
    want = 0.7 * torch.nn.functional.cross_entropy(s, y) + 0.3 * (q * (q.log() - p)).sum() / 4
    assert torch.allclose(paper_code_loss(s, t, y, temperature=3.0, alpha=0.3), want)


def test_cpu_providers_run_in_miniature():
    """Every CPU row's code path on one batch; a row's thread count does not leak out of it."""
    before = torch.get_num_threads()
    for w in (CPU, CPU32):
        for make, _ in CPU_PROVIDERS.values():
            make(dataclasses.replace(w, n_images=BATCH))()
    assert torch.get_num_threads() == before


def test_cuda_workload_runs_on_cpu_in_miniature():
    """The CUDA benchmark's code path (100 classes, 32 px, full width) on a few CPU images."""
    tiny = dataclasses.replace(CUDA, device="cpu", n_images=2 * BATCH, workers=0,
                               width={"downsample_factor": 64})
    for make, _ in PROVIDERS.values():
        make(tiny)()
