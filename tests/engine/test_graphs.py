"""cuda_graphs on CPU, through the recording backend (graphs.RecordingBackend): the teacher's,
the online and the student's steps captured once per input signature and replayed.

The recording backend replays the recorded aten ops on the same tensors (a CUDA graph's contract:
static memory, no Python at replay), so a step that reads a stale input, a rate frozen at capture
or host state changed only at capture gives different numbers here. The reference is the eager
engine with the same optimizers and deferred checks (itself checked against naive loops in
test_distill.py and test_deferred_checks.py): equal bitwise, over 3 epochs with a partial last
batch (a second capture) and a rate that changes every 3 steps."""

import contextlib

import pytest
import torch
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    InPlaceDecay,
    ScaledLogits,
    assert_same_weights,
    fused_sgd_tensor_lr,
    make_pair,
    make_source,
    one_thread,
    ref_kd_loss,
    train_epochs,
)

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.distill import (
    NonFiniteLossError,
    ReplayMismatchError,
    SelfDistiller,
    SpacedDistiller,
)
from spacedkd_fast.engine.graphs import HostSyncInGraphError, RecordingBackend, StepGraphs
from spacedkd_fast.ops.objective import KDObjective

L, EPOCHS = 7, 3  # make_source: 50 samples in batches of 8, the 7th batch holds 2


def build(mode, graphs, *, every=4, teacher=None, student=None, source=None, keyed=True, **kw):
    """A pair distiller; ``keyed=False``: copy replay (the batches still come from
    ``d.batches``, a source the distiller does not know)."""
    if teacher is None:
        teacher, student = make_pair(0)
    t_opt, s_opt = fused_sgd_tensor_lr(teacher), fused_sgd_tensor_lr(student)
    kw.setdefault("loss", KDObjective(3.0, 0.3, 1.0))
    source = source or make_source()
    d = SpacedDistiller(teacher, student, t_opt, s_opt, mode=mode, interval_rate=1.5,
                        steps_per_epoch=L, source=source if keyed else None, beta=0.03,
                        check_finite_every=every, cuda_graphs=graphs,
                        teacher_scheduler=InPlaceDecay(t_opt), student_scheduler=InPlaceDecay(s_opt),
                        **kw)
    d.batches = source
    return d


def train(d, epochs=EPOCHS, after=None):
    """``epochs`` epochs of ``d.batches``; the stats of each epoch and of the end."""
    return train_epochs(d, d.batches, epochs, after)


def opt_states_equal(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("mode,kw", [
    ("online", {}), ("spaced", {}), ("offline", {}), ("base", {}),
    ("spaced", dict(keyed=False)),  # copy replay
    ("spaced", dict(teacher_bn_update=True)),  # soft targets write the teacher's BN buffers
    ("online", dict(check_finite=False, every=1)),  # no checks at all
])
def test_a_graphed_run_equals_the_eager_run_bitwise(mode, kw):
    eager, graphed = build(mode, False, **kw), build(mode, RecordingBackend(), **kw)
    s_eager, s_graphed = train(eager), train(graphed)
    assert s_graphed == s_eager  # every logged mean, bitwise
    for a, b in ((eager.student, graphed.student), (eager.teacher, graphed.teacher)):
        assert_same_weights(a, b)
    opt_states_equal(eager.student_opt, graphed.student_opt)
    # the rate moved, and the captured steps read it (a frozen rate would change the weights)
    assert float(graphed.student_opt.param_groups[0]["lr"]) < 0.05 * 0.7 ** 5
    g = graphed._graphs
    assert g.captures >= 2 and g.replays > g.warmups
    assert eager.teacher_steps == graphed.teacher_steps
    assert eager.student_steps == graphed.student_steps


def float32_pair_and_source():
    teacher, student = make_pair(0, dtype=torch.float32)
    src = make_source()
    return teacher, student, InMemorySource(src.x.float(), src.y, 8, seed=0, noise=0.1)


class SeesAutocast(torch.nn.Module):
    """Wraps a ``(features, logits)`` model; records, at each forward under autocast, whether
    autocast's weight-cast cache is on."""

    def __init__(self, inner: torch.nn.Module, seen: list) -> None:
        super().__init__()
        self.inner, self.feature_dim, self.seen = inner, inner.feature_dim, seen

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            self.seen.append(torch.is_autocast_cache_enabled())
        return self.inner(x)


@pytest.mark.parametrize("mode", ["spaced", "online", "base"])
def test_graphed_steps_autocast_without_the_weight_cast_cache(mode):
    """torch's rule for autocast in captured work (cache_enabled=False): in every forward of a
    graphed run, warm-ups and captures alike; the eager engine keeps the cache. The values are
    the same (a cast is a cast): bf16 autocast, graphed equals eager bitwise."""
    out = []
    for graphs in (False, RecordingBackend()):
        teacher, student, src = float32_pair_and_source()
        seen = []
        d = build(mode, graphs, teacher=SeesAutocast(teacher, seen),
                  student=SeesAutocast(student, seen), source=src, amp_dtype=torch.bfloat16)
        out.append((train(d), d, seen))
    (s_eager, eager, seen_eager), (s_graphed, graphed, seen_graphed) = out
    assert seen_eager and all(seen_eager)
    assert seen_graphed and not any(seen_graphed)
    assert graphed._graphs.captures >= 2 and graphed._graphs.replays > graphed._graphs.warmups
    assert s_graphed == s_eager
    assert_same_weights(eager.student, graphed.student)
    assert torch.is_autocast_cache_enabled()  # restored after the run


def test_a_rate_replaced_by_load_state_dict_becomes_a_tensor_again():
    """A resume loads optimizer states after the distiller is built; torch puts the saved rate
    back (here a float). The warm-up turns it into a tensor again, so captured steps follow the
    schedule: the run equals the eager one."""
    eager, graphed = build("spaced", False), build("spaced", RecordingBackend())
    for d in (eager, graphed):
        for opt in (d.teacher_opt, d.student_opt):
            state = opt.state_dict()
            for g in state["param_groups"]:
                g["lr"] = 0.05
            opt.load_state_dict(state)
    for opt in (eager.teacher_opt, eager.student_opt):  # what the warm-up makes of 0.05
        for g in opt.param_groups:
            g["lr"] = torch.tensor(0.05, dtype=torch.float32)
    assert train(graphed) == train(eager)
    assert_same_weights(eager.student, graphed.student)
    assert graphed.student_opt.param_groups[0]["lr"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["spaced", "online"])
def test_an_optimizer_rolled_back_mid_run_is_what_the_graphs_step_with(mode):
    """load_state_dict after the captures (a rollback to a saved optimizer state) puts new rate
    and momentum tensors into the optimizer; the schedule then writes those. The graphs must
    step with the loaded momentum and the rate the schedule writes: the run equals the eager
    one, and the tensors the graphs were captured with are the optimizer's again."""
    import copy

    eager, graphed = build(mode, False), build(mode, RecordingBackend())
    saved, captured = {}, {}

    def roll_back(d):
        def after(n):
            if n == 2 * L:  # everything captured by now
                saved[id(d)] = [copy.deepcopy(o.state_dict()) for o in (d.teacher_opt,
                                                                        d.student_opt)]
            if n == 2 * L + 4:  # back to the state of 4 steps ago: other momentum values
                opt = d.student_opt
                p = opt.param_groups[0]["params"][0]
                captured[id(d)] = opt.param_groups[0]["lr"], opt.state[p]["momentum_buffer"]
                for o, state in zip((d.teacher_opt, d.student_opt), saved[id(d)]):
                    o.load_state_dict(state)
        return after

    assert train(graphed, after=roll_back(graphed)) == train(eager, after=roll_back(eager))
    assert graphed._graphs.captures >= 2 and graphed._graphs.replays > graphed._graphs.warmups
    for a, b in ((eager.student, graphed.student), (eager.teacher, graphed.teacher)):
        assert_same_weights(a, b)
    opt_states_equal(eager.student_opt, graphed.student_opt)
    opt_states_equal(eager.teacher_opt, graphed.teacher_opt)
    for d, kept in ((graphed, True), (eager, False)):  # eager: really replaced
        opt = d.student_opt
        p = opt.param_groups[0]["params"][0]
        lr, buf = captured[id(d)]
        assert (opt.param_groups[0]["lr"] is lr) == kept
        assert (opt.state[p]["momentum_buffer"] is buf) == kept


def test_warm_up_then_one_capture_per_signature():
    # spaced: teacher steps on full and partial batches, replays (train-mode teacher) on both
    d = build("spaced", RecordingBackend(warmup=2))
    train(d)
    g = d._graphs
    assert g.captures == 4 and g.warmups == 4 * 2
    assert g.replays == d.teacher_steps + d.student_steps - g.warmups
    # offline: the student's steps run against the teacher in eval mode after the teacher's
    d = build("offline", RecordingBackend(warmup=1))
    train(d)
    assert d._graphs.captures == 4 and d._graphs.warmups == 4
    roles = sorted(sig[0] for sig in d._graphs.entries)
    assert roles == ["student", "student", "teacher", "teacher"]


@pytest.mark.parametrize("overlap", [False, True])
def test_captures_stay_bounded_over_many_intervals(overlap):
    """Every replay builds a new loss closure (and with overlap reads the teacher snapshot): the
    signature must not change per interval, or each interval would warm up and capture again
    (a private memory pool per graph, growing all run). overlap=True: on CPU the lanes stay
    inert, so this is the overlap's order on one stream (snapshot published per interval,
    student steps issued one per teacher step), graphed against eager in that order."""
    eager, graphed = build("spaced", False), build("spaced", RecordingBackend())
    for d in (eager, graphed):
        d.overlap = overlap
    snapshots, captures = set(), []

    def after(n):
        if graphed._snapshot is not None:
            snapshots.add(id(graphed._snapshot))
        if n % L == 0:
            captures.append(graphed._graphs.captures)

    assert train(graphed, epochs=8, after=after) == train(eager, epochs=8)
    assert_same_weights(eager.student, graphed.student)
    g = graphed._graphs
    assert graphed.student_steps > 5 * graphed.schedule.interval  # many intervals
    # teacher and student, full and partial batch, all captured in the first four epochs (the
    # overlapped student replays an interval late)
    assert captures[3:] == [4] * 5
    # with overlap the end-of-run flush replays against the live teacher: its own signatures
    assert len(g.entries) == (6 if overlap else 4) and g.captures <= len(g.entries)
    assert len(snapshots) == (1 if overlap else 0)  # one snapshot, copied into in place


def test_a_signature_keeps_the_modules_its_step_reads_alive():
    """A key with id(module) could be matched by a new module at a dead one's address, and its
    graph would read freed memory: the key holds the module."""
    import gc
    import weakref

    from spacedkd_fast.engine.graphed_steps import _kernel_state

    def loss_reading(module):
        def loss_fn(x, y):
            return module(x), {}
        return loss_fn

    m = torch.nn.Linear(2, 2)
    ref = weakref.ref(m)
    key = _kernel_state(loss_reading(m))
    del m
    gc.collect()
    assert ref() is not None and key[1][0][0] is ref()
    assert _kernel_state(loss_reading(ref())) == key  # the same module: the same signature
    assert _kernel_state(loss_reading(torch.nn.Linear(2, 2))) != key


def test_the_recording_backend_replays_static_memory():
    """A replay reads the tensors the capture saw: a tensor rebound afterwards is not seen (as
    in a CUDA graph), one written in place is."""
    g = StepGraphs(RecordingBackend(warmup=1))
    w = torch.tensor([2.0])
    rate = torch.tensor([3.0])
    sig = ("t",)
    with g.warm_up(sig, "t", w.device):
        pass
    out = g.replay(sig, w.device, (torch.tensor([1.0]),), lambda x: x * w * rate)
    assert out.tolist() == [6.0]
    w = torch.tensor([100.0])  # rebound: the graph still multiplies by 2
    rate.fill_(5.0)  # in place: seen
    out2 = g.replay(sig, w.device, (torch.tensor([4.0]),), None)
    assert out2 is out and out.tolist() == [40.0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "every_other_image"])
def test_static_inputs_keep_the_layout_of_the_warm_up(layout):
    """The captured step runs on the layout its eager warm-up ran on (cuDNN picks algorithms per
    layout: a new one would be searched inside the capture): static buffers take the input's
    strides, also those of a non-dense input, which clone() would make contiguous."""
    make = {"contiguous": lambda: torch.randn(8, 3, 4, 4),
            "channels_last": lambda: torch.randn(8, 3, 4, 4).contiguous(
                memory_format=torch.channels_last),
            "every_other_image": lambda: torch.randn(16, 3, 4, 4)[::2]}
    x = make[layout]()
    seen = []
    g = StepGraphs(RecordingBackend(warmup=1))
    sig = ("t", x.stride())
    with g.warm_up(sig, "t", x.device):
        pass

    def body(sx):
        seen.append(sx.stride())
        return sx * 2

    assert torch.equal(g.replay(sig, x.device, (x,), body), x * 2)
    assert seen == [x.stride()]
    x2 = make[layout]()
    assert torch.equal(g.replay(sig, x.device, (x2,), body), x2 * 2)


@pytest.mark.parametrize("read", ["item", "tolist", "bool", "nonzero", "equal", "float"])
def test_a_host_read_inside_a_captured_step_is_refused(read):
    x = torch.randn(4)
    reads = {"item": lambda: x.sum().item(), "tolist": lambda: x.tolist(),
             "bool": lambda: 1 if (x > 0).any() else 0, "nonzero": lambda: x.nonzero(),
             "equal": lambda: torch.equal(x, x), "float": lambda: float(x.sum())}
    with pytest.raises(HostSyncInGraphError, match="cannot capture"):
        RecordingBackend().capture(reads[read], x.device)


class ClampsOnHost(torch.nn.Module):
    """A student that reads its activations on the host each forward (fine eagerly)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.feature_dim = inner, inner.feature_dim

    def forward(self, x):
        f, z = self.inner(x)
        if z.abs().max() > 1e6:  # a host read
            z = z.clamp(-1e6, 1e6)
        return f, z


def test_a_host_read_in_the_model_fails_the_capture_not_the_eager_run():
    t, s = make_pair(0)
    train(build("online", False, teacher=t, student=ClampsOnHost(s)), epochs=1)
    t, s = make_pair(0)
    d = build("online", RecordingBackend(), teacher=t, student=ClampsOnHost(s))
    with pytest.raises(HostSyncInGraphError, match="__bool__"):
        train(d, epochs=1)
    assert d._graphs.warmups == 1 and d._graphs.captures == 0


def poisoned_run(mode, graphs, role, at):
    teacher, student = make_pair(0)
    teacher, student = ScaledLogits(teacher), ScaledLogits(student)
    d = build(mode, graphs, teacher=teacher, student=student, every=5)
    target = teacher if role == "teacher" else student

    def poison(n):
        if n == at:
            target.scale.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError) as err:
        train(d, after=poison)
    return err.value, d


@pytest.mark.parametrize("mode,role,at", [("spaced", "student", 12), ("spaced", "teacher", 16),
                                          ("online", "student", 10), ("online", "teacher", 9)])
def test_a_nan_mid_run_stops_as_the_eager_deferred_run(mode, role, at):
    e_err, eager = poisoned_run(mode, False, role, at)
    g_err, graphed = poisoned_run(mode, RecordingBackend(), role, at)
    assert (g_err.step, g_err.role, g_err.key) == (e_err.step, e_err.role, e_err.key)
    assert g_err.role == role and str(g_err) == str(e_err)
    assert graphed._graphs.replays > 0  # the failing step was a replayed graph
    for a, b in ((eager.student, graphed.student), (eager.teacher, graphed.teacher)):
        assert_same_weights(a, b)
    opt_states_equal(eager.student_opt, graphed.student_opt)
    opt_states_equal(eager.teacher_opt, graphed.teacher_opt)


class Drifting(InMemorySource):
    """Gives back a different batch 4 at its second fetch (the replay)."""

    def batch(self, key):
        x, y = super().batch(key)
        return (x + 1e-6, y) if key == 4 else (x, y)


def test_a_replay_mismatch_stops_as_the_eager_deferred_run():
    base = make_source()
    out = []
    for graphs in (False, RecordingBackend()):
        src = Drifting(base.x, base.y, 8, seed=0, noise=0.1)
        d = build("spaced", graphs, source=src, every=5)
        with pytest.raises(ReplayMismatchError) as err:
            train(d, epochs=2)
        out.append((err.value, d))
    (e_err, eager), (g_err, graphed) = out
    assert g_err.key == e_err.key == 4 and g_err.got == e_err.got
    assert graphed._graphs.replays > 0
    assert_same_weights(eager.student, graphed.student)


# -- preconditions: one line each, naming the fix ----------------------------------------------
def adam(model, **kw):
    return torch.optim.Adam(model.parameters(), **kw)


@pytest.mark.parametrize("change,match", [
    (dict(every=1), "check_finite_every > 1"),
    (dict(every=1, check_finite=False), "check_finite_every > 1"),  # keyed replay still reads
    (dict(trace="TRACE"), "trace"),
    (dict(grad_scaler=object(), every=1, check_finite=False, mode="online"), "grad_scaler"),
    (dict(replay="fresh"), "replay='fresh'"),
    (dict(mode="frozen"), "mode 'frozen'"),
])
def test_preconditions(change, match, tmp_path):
    if change.get("trace") == "TRACE":
        change["trace"] = tmp_path / "t.jsonl"
    mode = change.pop("mode", "spaced")
    with pytest.raises(ValueError, match=match) as err:
        build(mode, RecordingBackend(), **change)
    assert "\n" not in str(err.value) and "cuda_graphs=False" in str(err.value)


def test_check_finite_off_is_accepted_without_a_keyed_replay():
    d = build("online", RecordingBackend(), every=1, check_finite=False)
    train(d, epochs=2)
    assert d._graphs.replays > 0


@pytest.mark.parametrize("make_opt,checks", [
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.05, fused=True), {}),  # a float rate
    # not fused (without deferred checks, which refuse it first)
    (lambda m: torch.optim.SGD(m.parameters(), lr=torch.tensor(0.05, dtype=torch.float64)),
     dict(check_finite=False, mode="online")),
    (lambda m: adam(m, lr=torch.tensor(0.01, dtype=torch.float64), fused=True), {}),  # capturable
])
def test_optimizers_must_be_fused_with_a_tensor_rate(make_opt, checks):
    teacher, student = make_pair(0)
    kw = dict(mode="spaced", check_finite_every=4) | checks
    with pytest.raises(ValueError, match="tensor lr") as err:
        SpacedDistiller(teacher, student, make_opt(teacher), make_opt(student), steps_per_epoch=L,
                        source=make_source(), loss=ref_kd_loss, cuda_graphs=RecordingBackend(),
                        **kw)
    assert "\n" not in str(err.value)


def test_a_capturable_fused_adam_is_accepted_and_equals_eager():
    """Adam's step count is a tensor the captured step increments in place."""
    out = []
    for graphs in (False, RecordingBackend()):
        teacher, student = make_pair(0)
        kw = dict(lr=torch.tensor(0.01, dtype=torch.float64), fused=True, capturable=True)
        d = SpacedDistiller(teacher, student, adam(teacher, **kw), adam(student, **kw),
                            mode="online", steps_per_epoch=L, source=make_source(),
                            check_finite_every=4, loss=ref_kd_loss, cuda_graphs=graphs)
        d.batches = d.source
        train(d, epochs=2)
        out.append(d)
    eager, graphed = out
    assert graphed._graphs.replays > 0
    assert_same_weights(eager.student, graphed.student)
    opt_states_equal(eager.student_opt, graphed.student_opt)


def test_the_cuda_backend_captures_in_thread_local_mode(monkeypatch):
    """torch.cuda.graph's default mode ('global') fails a capture when another thread makes an
    unsafe CUDA call, and the prefetch thread pins the next batch (events queried) at any time:
    the backend must ask for 'thread_local' (run for real in test_graphs_cuda.py)."""
    from spacedkd_fast.engine.graphs import CudaGraphBackend

    seen = []

    class FakeGraph:
        pass

    @contextlib.contextmanager
    def fake_graph(graph, pool=None, stream=None, capture_error_mode="global"):
        seen.append(capture_error_mode)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    graph, out = CudaGraphBackend().capture(lambda: 7, torch.device("cpu"))
    assert isinstance(graph, FakeGraph) and out == 7 and seen == ["thread_local"]


def test_the_cuda_backend_needs_a_cuda_device():
    with pytest.raises(ValueError, match="need a CUDA device.*cuda_graphs=False"):
        build("spaced", True)


def test_a_shared_optimizer_is_refused():
    teacher, student = make_pair(0)
    opt = torch.optim.SGD(list(teacher.parameters()) + list(student.parameters()),
                          lr=torch.tensor(0.05, dtype=torch.float64), fused=True)
    with pytest.raises(ValueError, match="shared optimizer"):
        SpacedDistiller(teacher, student, opt, opt, mode="online", shared_optimizer=True,
                        steps_per_epoch=L, check_finite_every=4, loss=KDObjective(3.0, 0.3, 1.0),
                        cuda_graphs=RecordingBackend())


def test_bad_values_and_the_self_distiller_are_refused():
    with pytest.raises(ValueError, match="True, False or a graph backend"):
        build("spaced", "on")
    with pytest.raises(ValueError, match="warmup"):
        RecordingBackend(warmup=0)
    model = make_pair(0)[1]
    with pytest.raises(ValueError, match="not supported for SelfDistiller yet"):
        SelfDistiller(model, fused_sgd_tensor_lr(model), steps_per_epoch=L,
                      check_finite_every=4, cuda_graphs=RecordingBackend())


@pytest.mark.parametrize("mode", ["online", "spaced"])
def test_models_evaluated_between_epochs_are_back_in_train_mode_as_eagerly(mode):
    """A replay runs no Python: the graphed step sets the train mode on the host itself."""
    out = []
    for graphs in (False, RecordingBackend()):
        d = build(mode, graphs)
        modes = []
        for e in range(EPOCHS):
            for key, (x, y) in d.batches.epoch(e):
                d.step(key, x, y)
                modes.append((d.teacher.training, d.student.training))
            d.teacher.eval()  # the trainer evaluates between epochs
            d.student.eval()
        d.finish()
        out.append((modes, d))
    (m_eager, eager), (m_graphed, graphed) = out
    assert m_graphed == m_eager and (True, True) in m_graphed
    assert_same_weights(eager.student, graphed.student)
    assert graphed._graphs.replays > 0
