"""The spacing engine: per-step overhead against a bare hand-written loop, bytes held per buffered
sample, and (CUDA) spaced vs online step time with overlap on and off.

- ``engine-overhead-cpu``: one round = 20 batches of spaced KD with ``I = 10`` (20 teacher steps,
  two replays of 10 student steps), toy MLPs with BatchNorm (512 -> 1024 teacher, 512 -> 512
  student, 100 classes, batch 128). Baseline: a bare loop that does the same work the way the
  official code does (pixel copies, teacher in train mode). The engine's target is under 5 %
  overhead. Without ``SPACEDKD_BENCH_QUICK`` each engine row's note also gives the ratio from
  rounds run alternately with the bare loop (robust to a shared machine's changing load).
- ``replay-bytes-*``: recording and fetching a few CIFAR-100 / ImageNet-shaped batches with keyed
  replay vs ``CopyReplay`` on the host in float32 (the official buffer); each row's note gives the
  bytes held per buffered sample measured from the buffer and computed, the keyed record's
  resident memory with its Python objects (Linux), and the whole interval's buffer at s = 1.5 (CIFAR-100: L = 391, I = 586, batch 128; ImageNet: L = 5,005, I = 7,507,
  batch 256).
- ``engine-cuda-resnet18`` (CUDA only): CIFAR ResNet-18 teacher and student, batch 128
  (``SPACEDKD_BENCH_ENGINE_CUDA_BATCH`` changes it); time per round of 48 batches for online,
  spaced with overlap off / on, with the per-step finite check, without it, and with the deferred
  check read every 16 updates (fused SGD: unmeasured on a GPU so far).
- ``engine-finite-check-cpu-*``: the finite check every step vs every 16 updates vs none, on CPU
  (fused SGD; the note gives interleaved A/B ratios with their spread), for the MLP above and for
  the tests' toy pair (batch 8, host work dominant). A CPU host read costs no
  pipeline drain: this row shows the deferred check's own extra work, not the GPU saving.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.replay import CopyReplay, KeyedReplay
from spacedkd_fast.engine.trace import batch_checksum

QUICK = os.environ.get("SPACEDKD_BENCH_QUICK", "0") not in ("", "0")


def _toys():
    """The tests' toy models and reference loss (one definition of "the reference")."""
    path = Path(__file__).resolve().parent.parent / "tests" / "helpers" / "toys.py"
    spec = importlib.util.spec_from_file_location("_engine_toys", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toys = _toys()


def _kd_loss():
    """The package's fused loss where it runs on this build, else the plain-torch reference
    (``SPACEDKD_BENCH_ENGINE_LOSS=plain`` forces the reference)."""
    if os.environ.get("SPACEDKD_BENCH_ENGINE_LOSS") == "plain":
        return toys.ref_kd_loss, "plain-torch loss"
    try:
        from spacedkd_fast.ops.objective import KDLoss

        kd = KDLoss(temperature=3.0, alpha=0.3, kd_scale=1.0)
        z = torch.randn(4, 5)
        kd(z, z, torch.zeros(4, dtype=torch.long))
        return kd, "fused KDLoss"
    except Exception:  # noqa: BLE001 (no compiled op here: fall back, and say so)
        return toys.ref_kd_loss, "plain-torch loss"


# ---------------------------------------------------------------------------------------------
# per-step overhead on CPU
IN, HID_T, HID_S, CLASSES, BATCH, INTERVAL, ROUND = 512, 1024, 512, 100, 128, 10, 20


def _cpu_setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * 40, IN, generator=g)
    y = torch.randint(0, CLASSES, (BATCH * 40,), generator=g)
    src = InMemorySource(x, y, BATCH, seed=0)
    torch.manual_seed(0)
    teacher = toys.TinyNet(HID_T, classes=CLASSES, in_dim=IN, dtype=torch.float32)
    student = toys.TinyNet(HID_S, classes=CLASSES, in_dim=IN, dtype=torch.float32)
    return src, teacher, student


def _keys(src):
    return itertools.chain.from_iterable(src.epoch(e) for e in itertools.count())


def _bare_loop_round(kd):
    """The official way: teacher step, keep a pixel copy, replay every I steps."""
    src, teacher, student = _cpu_setup()
    t_opt, s_opt = toys.sgd(teacher), toys.sgd(student)
    proj = toys.seeded_projector(HID_S, HID_T)
    s_opt.add_param_group({"params": list(proj.parameters())})
    it, buffer = _keys(src), []

    def run_round():
        for _ in range(ROUND):
            _, (x, y) = next(it)
            _, t_z = teacher(x)
            loss = F.cross_entropy(t_z, y)
            t_opt.zero_grad()
            loss.backward()
            t_opt.step()
            buffer.append((x.clone(), y.clone()))
            if len(buffer) == INTERVAL:
                for bx, by in buffer:
                    with torch.no_grad():
                        t_f, t_z = teacher(bx)
                    s_f, s_z = student(bx)
                    s_loss = kd(s_z, t_z, by) + 0.03 * torch.dist(proj(s_f), t_f)
                    s_opt.zero_grad()
                    s_loss.backward()
                    s_opt.step()
                buffer.clear()

    return run_round


def _fused_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                           fused=True)


def _tiny_setup():
    """Toy sizes where the engine's host work, not arithmetic, is most of a step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, toys.IN_DIM, generator=g)
    y = torch.randint(0, toys.CLASSES, (400,), generator=g)
    teacher, student = toys.make_pair(0, dtype=torch.float32)
    return InMemorySource(x, y, 8, seed=0), teacher, student


def _engine_round(kd, keyed, check_finite=True, every=1, fused=False, setup=_cpu_setup):
    src, teacher, student = setup()
    opt = _fused_sgd if fused else toys.sgd
    d = SpacedDistiller(teacher, student, opt(teacher), opt(student), mode="spaced",
                        interval_rate=INTERVAL / src.steps_per_epoch,
                        steps_per_epoch=src.steps_per_epoch, loss=kd, beta=0.03,
                        feature_loss=torch.dist, source=src if keyed else None,
                        check_finite=check_finite, check_finite_every=every)
    assert d.schedule.interval == INTERVAL
    it = _keys(src)

    def run_round():
        for _ in range(ROUND):
            key, (x, y) = next(it)
            d.step(key, x, y)

    return run_round


def _interleaved_ratio(kd, make_engine, pairs: int) -> float:
    """Median over ``pairs`` of (engine round time / bare round time), the two run alternately,
    so that a shared machine's changing load hits both alike."""
    bare, engine = _bare_loop_round(kd), make_engine()
    bare()
    engine()
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        bare()
        t1 = time.perf_counter()
        engine()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(ratios)


@pytest.mark.parametrize("provider", ["bare-loop", "engine-keyed", "engine-copy",
                                      "engine-keyed-unchecked"])
def test_engine_overhead_cpu(bench, provider):
    kd, kd_name = _kd_loss()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier numbers on a shared machine; the same for every provider
    try:
        note = f"{ROUND} batches/round, {kd_name}, 1 thread"
        if provider == "bare-loop":
            fn = _bare_loop_round(kd)
        else:
            def make():
                return _engine_round(kd, keyed=provider != "engine-copy",
                                     check_finite=provider != "engine-keyed-unchecked")
            fn = make()
            if not QUICK:
                note += f"; interleaved A/B engine/bare = {_interleaved_ratio(kd, make, 6):.3f}"
        bench(fn, group="engine-overhead-cpu", provider=provider,
              baseline=provider == "bare-loop", device="cpu", rounds=3 if QUICK else 12,
              warmup=1, note=note)
    finally:
        torch.set_num_threads(threads)


FINITE_EVERY = 16
FINITE_PROVIDERS = {"check every step": (True, 1), f"check every {FINITE_EVERY}": (True, 16),
                    "no check": (False, 1)}


def _ab_ratios(make_a, make_b, pairs: int) -> list[float]:
    """Per pair, round time of ``b`` / round time of ``a``, the two run alternately."""
    a, b = make_a(), make_b()
    a()
    b()
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        a()
        t1 = time.perf_counter()
        b()
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return ratios


@pytest.mark.parametrize("size", ["mlp-512", "tiny"])
@pytest.mark.parametrize("provider", list(FINITE_PROVIDERS))
def test_finite_check_cost_cpu(bench, provider, size):
    """CPU: the finiteness check every step (a host read of each loss) against the deferred
    check (device flag fed to the fused optimizer, read every 16 updates) and no check; fused SGD
    everywhere, keyed replay. On a CPU a host read costs no pipeline drain, so this measures the
    deferred check's extra work, not the GPU saving it exists for."""
    kd, kd_name = _kd_loss()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check, every = FINITE_PROVIDERS[provider]

        setup = _cpu_setup if size == "mlp-512" else _tiny_setup

        def make(check=check, every=every):
            return _engine_round(kd, keyed=True, check_finite=check, every=every, fused=True,
                                 setup=setup)

        note = f"{ROUND} batches/round, {kd_name}, fused SGD, 1 thread, CPU"
        if provider != "check every step":
            ratios = _ab_ratios(lambda: make(True, 1), make, 4 if QUICK else 10)
            note += (f"; interleaved A/B time vs every-step: median {statistics.median(ratios):.3f}"
                     f" (min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} pairs)")
        bench(make(), group=f"engine-finite-check-cpu-{size}", provider=provider,
              baseline=provider == "check every step", device="cpu",
              rounds=3 if QUICK else 12, warmup=1, note=note)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# bytes held per buffered sample
CASES = {
    # name: (sample shape, batch, L, measured batches)
    "cifar100-s1.5": ((3, 32, 32), 128, 391, 8),
    "imagenet-s1.5": ((3, 224, 224), 256, 5005, 1),
}


def official_bytes_per_sample(shape) -> int:
    """The official host buffer: float32 pixels plus an int64 label per sample."""
    return 4 * shape[0] * shape[1] * shape[2] + 8


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("provider", ["copy-host-f32 (official)", "keyed"])
def test_replay_bytes(bench, case, provider):
    shape, batch, steps_per_epoch, count = CASES[case]
    interval = int(steps_per_epoch * 1.5)
    if QUICK and count > 2:
        count = 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 100, (batch,), generator=g)
    cs = batch_checksum(x, y)

    class _Same:  # a replayable source that gives back this one batch for every key
        def batch(self, key):
            return x, y

    def fill_and_drain():
        buf = KeyedReplay(_Same()) if provider == "keyed" else CopyReplay(device="cpu")
        for k in range(count):
            buf.record(k + 1, x, y, cs)
        held = buf.bytes_held() / buf.samples_held
        stored = sum(t.untyped_storage().nbytes() for r in buf.pending for t in (r.batch or ()))
        for rec in buf.take():
            buf.fetch(rec)
        return held, stored / (count * batch)

    held, stored = fill_and_drain()
    rss = _rss_per_keyed_record() if provider == "keyed" else None
    computed = (official_bytes_per_sample(shape) + 40 / batch if provider != "keyed"
                else 40 / batch)  # 8-byte key + 4 float64 checksum per batch
    assert held == pytest.approx(computed)
    interval_gb = held * interval * batch / 1e9
    bench(fill_and_drain, group=f"replay-bytes-{case}", provider=provider,
          baseline=provider.startswith("copy"), device="cpu", rounds=3 if QUICK else 10,
          bytes_per_sample=held, pixel_bytes_per_sample=stored,
          rss_bytes_per_record=rss,
          note=(f"{held:,.2f} B/sample held (computed {computed:,.2f}; tensor storage "
                f"{stored:,.0f}); s=1.5 interval of {interval} x {batch}: {interval_gb:,.4g} GB"
                + ("" if rss is None else
                   f"; process memory per record {rss:,.0f} B = {rss / batch:,.2f} B/sample")))


_RSS_SCRIPT = """
import gc, os, torch
from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.replay import KeyedReplay
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
buf = KeyedReplay(InMemorySource(torch.zeros(1, 1), torch.zeros(1), 1))
x, y = torch.zeros(256, 1), torch.zeros(256)
gc.collect()
before = rss()
for k in range(100_000):
    buf.record(k + 1, x, y, (1.0 * k, 2.0 * k, 3.0 * k, 4.0 * k))
gc.collect()
print((rss() - before) / 100_000)
"""


@functools.lru_cache(maxsize=1)
def _rss_per_keyed_record() -> float | None:
    """Resident memory per keyed record as the engine keeps it (key + host checksum tuple, the
    Python objects included), measured in a fresh process from /proc (Linux); None elsewhere."""
    if not Path("/proc/self/statm").exists():
        return None
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# CUDA: overlap on / off
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_models():
    from spacedkd_fast.models import create

    torch.manual_seed(0)
    return create("resnet18", num_classes=100).cuda(), create("resnet18", num_classes=100).cuda()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("provider", ["spaced overlap-off", "spaced overlap-on", "online",
                                      "spaced overlap-off unchecked",
                                      "spaced overlap-on unchecked",
                                      "spaced overlap-off check-every-16",
                                      "spaced overlap-on check-every-16"])
def test_engine_cuda_overlap(bench, provider):
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    batch = int(os.environ.get("SPACEDKD_BENCH_ENGINE_CUDA_BATCH", "128"))
    n = 16 * batch
    x = torch.randn(n, 3, 32, 32, generator=g).cuda()
    y = torch.randint(0, 100, (n,), generator=g).cuda()
    src = InMemorySource(x, y, batch, seed=0)  # L = 16, I = 24
    teacher, student = _cuda_models()
    kd, kd_name = _kd_loss()
    if kd_name.startswith("fused"):
        try:
            kd(torch.randn(2, 5, device="cuda"), torch.randn(2, 5, device="cuda"),
               torch.zeros(2, dtype=torch.long, device="cuda"))
        except Exception:  # noqa: BLE001 (a CPU-only build of the op)
            kd, kd_name = toys.ref_kd_loss, "plain-torch loss"
    mode = "online" if provider == "online" else "spaced"
    deferred = "check-every-16" in provider  # needs fused optimizers (found_inf)
    opt = _fused_sgd if deferred else toys.sgd
    d = SpacedDistiller(teacher, student, opt(teacher), opt(student), mode=mode,
                        interval_rate=1.5, steps_per_epoch=src.steps_per_epoch, loss=kd,
                        beta=0.03, feature_loss=torch.dist, source=src,
                        overlap="overlap-on" in provider,
                        check_finite="unchecked" not in provider,
                        check_finite_every=16 if deferred else 1)
    it = _keys(src)
    steps = 2 * 24

    def run_round():
        for _ in range(steps):
            key, (xb, yb) = next(it)
            d.step(key, xb, yb)
        torch.cuda.synchronize()

    bench(run_round, group="engine-cuda-resnet18", provider=provider,
          baseline=provider == "spaced overlap-off", device="cuda", rounds=3 if QUICK else 8,
          warmup=1, note=f"{steps} batches of {batch}/round, {kd_name}")
