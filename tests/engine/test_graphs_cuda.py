"""CUDA: cuda_graphs=True (torch.cuda.CUDAGraph) against the eager engine on a small ResNet pair.

Written without a GPU at hand (the CPU tests in test_graphs.py cover the capture logic through the
recording backend); these run under gpu_check.sh. What they check:

- fp32 with deterministic cuDNN: graphed == eager within 1e-6 of the weight scale (bitwise is
  expected: the same kernels run; the test prints which), over 3 epochs with a partial last batch
  and a rate that changes every 3 steps, for online and spaced;
- bf16 autocast + channels_last: within 1e-2 of the weight scale, also with cudnn.benchmark (its
  algorithm search happens in the eager warm-ups);
- graphs with overlap on (two lanes) against the sequential eager run, fp32;
- the partial batch gets its own graph (4 captures in a spaced run: teacher and student, full and
  partial batches), and once everything is captured no step syncs with the host between the
  deferred reads (torch.cuda.set_sync_debug_mode('error'));
- a NaN injected on the device mid-run stops the graphed run with the eager run's error;
- captures while another thread pins and copies (the data prefetch thread) succeed, and that
  thread sees no error (the backend's thread_local capture mode).
"""

import pytest
import torch
from helpers.toys import InPlaceDecay, ScaledLogits, fused_sgd_tensor_lr, train_epochs

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine import deferred_checks
from spacedkd_fast.engine.distill import NonFiniteLossError, SpacedDistiller
from spacedkd_fast.engine.graphs import CudaGraphBackend
from spacedkd_fast.models.cifar_resnet import cifar_resnet
from spacedkd_fast.ops.objective import KDObjective

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N, BATCH, CLASSES = 680, 64, 10  # 10 full batches and one of 40: L = 11


@pytest.fixture(autouse=True)
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def make_source():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, 32, 32, generator=g).cuda()
    y = torch.randint(0, CLASSES, (N,), generator=g).cuda()
    return InMemorySource(x, y, BATCH, seed=0, noise=0.05)


def build(mode, graphs, *, amp=None, overlap=False, source="keyed", poison=False, every=8):
    torch.manual_seed(0)
    teacher = cifar_resnet(18, CLASSES, downsample_factor=16).cuda()
    student = cifar_resnet(18, CLASSES, downsample_factor=64).cuda()
    if amp is not None:
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    if poison:
        teacher, student = ScaledLogits(teacher), ScaledLogits(student)
    t_opt, s_opt = fused_sgd_tensor_lr(teacher), fused_sgd_tensor_lr(student)
    src = make_source()
    d = SpacedDistiller(teacher, student, t_opt, s_opt, mode=mode, interval_rate=1.5,
                        steps_per_epoch=src.steps_per_epoch, loss=KDObjective(4.0, 0.9, 1.0),
                        source=src if source == "keyed" else None, overlap=overlap,
                        amp_dtype=amp, check_finite_every=every, cuda_graphs=graphs,
                        teacher_scheduler=InPlaceDecay(t_opt), student_scheduler=InPlaceDecay(s_opt))
    return d, src


def train(d, src, epochs=3, after=None):
    stats = train_epochs(d, src, epochs, after)
    torch.cuda.synchronize()
    return stats


def worst(a, b):
    """Largest difference of two models' parameters and buffers, over the weight scale."""
    sa, sb = a.state_dict(), b.state_dict()
    out = 0.0
    for k in sa:
        if sa[k].is_floating_point():
            scale = 1.0 + sa[k].abs().max().item()
            out = max(out, (sa[k].double() - sb[k].double()).abs().max().item() / scale)
        else:
            assert torch.equal(sa[k], sb[k]), k
    return out


def compare(eager, graphed, tol):
    for a, b in ((eager.teacher, graphed.teacher), (eager.student, graphed.student)):
        diff = worst(a, b)
        print(f"graphed vs eager: {'bitwise' if diff == 0 else f'max rel diff {diff:.2e}'}")
        assert diff <= tol


@pytest.mark.parametrize("mode", ["online", "spaced"])
def test_fp32_graphed_equals_eager(mode):
    eager, src = build(mode, False)
    s_eager = train(eager, src)
    graphed, src = build(mode, True)
    s_graphed = train(graphed, src)
    compare(eager, graphed, 1e-6)
    for a, b in zip(s_eager, s_graphed):
        assert a.keys() == b.keys()
        assert all(b[k] == pytest.approx(a[k], rel=1e-5) for k in a)
    assert graphed._graphs.replays > graphed._graphs.warmups


@pytest.mark.parametrize("benchmark", [False, True])
def test_bf16_channels_last_graphed_within_bf16_tolerance(benchmark):
    """benchmark=True: cuDNN's algorithm search (the trainer turns it on) must happen in the
    eager warm-ups (same shapes and strides), never inside a capture."""
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = not benchmark
    eager, src = build("spaced", False, amp=torch.bfloat16)
    train(eager, src)
    graphed, src = build("spaced", True, amp=torch.bfloat16)
    train(graphed, src)
    assert graphed._graphs.captures == 4
    compare(eager, graphed, 1e-2)


def test_graphs_compose_with_overlap():
    eager, src = build("spaced", False, overlap=False)
    train(eager, src)
    graphed, src = build("spaced", True, overlap=True)
    assert graphed.overlap
    train(graphed, src)
    compare(eager, graphed, 1e-6)


def test_captures_survive_a_thread_that_pins_and_copies_meanwhile():
    """The data prefetch thread pins and copies the next batch while the engine captures a step
    mid-epoch: with torch's default capture mode ('global') that thread's pin_memory (event
    queries, cudaHostAlloc) fails with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and the capture is
    invalidated; the backend captures in 'thread_local' mode."""
    import threading

    errors, stop = [], threading.Event()

    def pin_and_copy():
        side = torch.cuda.Stream()
        n = 0
        try:
            while not stop.is_set():
                n = n % 64 + 1
                host = torch.empty(n * 4096, pin_memory=True)  # pinned blocks: new, or event-queried
                with torch.cuda.stream(side):
                    host.to("cuda", non_blocking=True)
                side.synchronize()
        except Exception as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    eager, src = build("spaced", False)
    train(eager, src)
    graphed, src = build("spaced", True)
    worker = threading.Thread(target=pin_and_copy, daemon=True)
    worker.start()
    try:
        train(graphed, src)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert graphed._graphs.captures == 4
    compare(eager, graphed, 1e-6)


def test_the_partial_batch_gets_its_own_graph_and_replays_do_not_sync(monkeypatch):
    real_read = deferred_checks.DeferredChecks.read

    def read_allowed(self):  # the deferred read is the one sync allowed
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_read(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    d, src = build("spaced", CudaGraphBackend(warmup=1), source="copy")
    batches = [b for e in range(5) for b in src.epoch(e)]  # drawn before the sync check
    # L = 11, interval 16: the student's partial batch (11) is warmed up at the replay after
    # step 16 and captured at the one after step 32 (it holds batch 22); a capture syncs
    for key, (x, y) in batches[:3 * 11]:
        d.step(key, x, y)
    g = d._graphs
    assert g.captures == 4  # teacher and student, full and partial batches
    partial = [sig for sig in g.entries if sig[1][0][0] == N % BATCH]
    assert len(partial) == 2 and all(g.entries[s].graph is not None for s in partial)
    torch.cuda.synchronize()
    monkeypatch.setattr(deferred_checks.DeferredChecks, "read", read_allowed)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for key, (x, y) in batches[3 * 11:]:  # two epochs, with the replay after step 48
            d.step(key, x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert g.captures == 4
    d.finish()


@pytest.mark.parametrize("role,at", [("student", 23), ("teacher", 26)])
def test_a_nan_mid_run_stops_as_the_eager_deferred_run(role, at):
    out = []
    for graphs in (False, True):
        d, src = build("spaced", graphs, poison=True, every=5)
        target = d.teacher if role == "teacher" else d.student

        def poison(n, target=target):
            if n == at:
                target.scale.fill_(float("nan"))

        with pytest.raises(NonFiniteLossError) as err:
            train(d, src, after=poison)
        torch.cuda.synchronize()
        out.append((err.value, d))
    (e_err, eager), (g_err, graphed) = out
    assert (g_err.step, g_err.role, g_err.key) == (e_err.step, e_err.role, e_err.key)
    assert g_err.role == role and graphed._graphs.replays > 0
    compare(eager, graphed, 1e-6)
