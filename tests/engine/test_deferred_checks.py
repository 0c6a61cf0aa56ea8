"""check_finite_every = N > 1: losses and replay checksums checked on the device, the flag read
once every N updates; a failing step and every later one are skipped on the device (fused
optimizers' ``found_inf``), and the error at the next read names the first failure. Checked
against a naive loop that reads every loss on the host and stops before the first bad one."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    NaNOnCall,
    TinyMultiExit,
    assert_same_weights,
    first_nonfinite,
    fused_sgd,
    make_pair,
    make_source,
    one_thread,
    ref_kd_loss,
)
from torch.overrides import TorchFunctionMode

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.distill import (
    NonFiniteLossError,
    ReplayMismatchError,
    SelfDistiller,
    SpacedDistiller,
)

L, INTERVAL_RATE = 7, 1.5  # interval 10 teacher steps


def fused_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05, fused=True)


def naive_spaced_until_nan(teacher, student, t_opt, s_opt, batches, interval):
    """Spaced KD (SPEC defaults: teacher BN untouched by soft targets, tail replayed) with every
    loss read on the host; stops before the update of the first non-finite loss, putting back the
    BN buffers its forward wrote. Returns ``(role, step)`` of that loss, or None."""
    teacher.train()
    student.train()
    buffer, t_steps, s_steps = [], 0, 0

    def guarded(model, fn, *args):
        saved = copy.deepcopy(dict(model.named_buffers()))
        loss = fn(*args)
        if not torch.isfinite(loss):
            with torch.no_grad():
                for name, b in model.named_buffers():
                    b.copy_(saved[name])
        return loss

    def replay():
        nonlocal s_steps
        for bx, by in buffer:
            saved = copy.deepcopy(dict(teacher.named_buffers()))
            with torch.no_grad():
                _, t_z = teacher(bx)
                for name, b in teacher.named_buffers():
                    b.copy_(saved[name])
            loss = guarded(student, lambda a, t, b: ref_kd_loss(student(a)[1], t, b), bx, t_z, by)
            if not torch.isfinite(loss):
                return ("student", s_steps + 1)
            s_opt.zero_grad()
            loss.backward()
            s_opt.step()
            s_steps += 1
        buffer.clear()
        return None

    for n, (x, y) in enumerate(batches, start=1):
        loss = guarded(teacher, lambda a, b: F.cross_entropy(teacher(a)[1], b), x, y)
        if not torch.isfinite(loss):
            return ("teacher", t_steps + 1)
        t_opt.zero_grad()
        loss.backward()
        t_opt.step()
        t_steps += 1
        buffer.append((x, y))
        if n % interval == 0 and (bad := replay()):
            return bad
    return replay()


def run_engine(where, bad, every, make_opt=fused_sgd, mode="spaced", epochs=3, source=True):
    teacher, student = make_pair(0)
    wrapped_t = NaNOnCall(teacher, bad if where == "teacher" else 0)
    wrapped_s = NaNOnCall(student, bad if where == "student" else 0)
    t_opt, s_opt = make_opt(teacher), make_opt(student)
    src = make_source()
    d = SpacedDistiller(wrapped_t, wrapped_s, t_opt, s_opt, mode=mode,
                        interval_rate=INTERVAL_RATE, steps_per_epoch=L, loss=ref_kd_loss,
                        source=src if source else None, check_finite_every=every)
    return first_nonfinite(d, src.epochs(epochs)), (teacher, student, t_opt, s_opt), d


def assert_same_opt_state(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("where,bad", [("student", 12), ("teacher", 14), ("student", 1)])
def test_deferred_stop_equals_a_naive_loop_stopped_before_the_bad_step(where, bad):
    err, (teacher, student, t_opt, s_opt), d = run_engine(where, bad, every=5)
    assert err is not None
    ref_t, ref_s = make_pair(0)
    rt_opt, rs_opt = fused_sgd(ref_t), fused_sgd(ref_s)
    batches = [b for _, b in make_source().epochs(3)]
    nan_t = NaNOnCall(ref_t, bad if where == "teacher" else 0)
    nan_s = NaNOnCall(ref_s, bad if where == "student" else 0)
    role, step = naive_spaced_until_nan(nan_t, nan_s, rt_opt, rs_opt, batches, 10)
    assert (err.role, err.step) == (role, step) == (where, bad)
    assert_same_weights(teacher, ref_t)
    assert_same_weights(student, ref_s)
    assert_same_opt_state(t_opt, rt_opt)
    assert_same_opt_state(s_opt, rs_opt)  # bad=1: no half-made momentum buffer is left


@pytest.mark.parametrize("make_opt", [fused_sgd, fused_adamw], ids=["sgd", "adamw"])
@pytest.mark.parametrize("mode,where,bad", [("online", "student", 9), ("online", "teacher", 4),
                                            ("spaced", "student", 16), ("offline", "student", 6),
                                            ("base", "student", 4)])
def test_deferred_stop_equals_the_every_step_check(make_opt, mode, where, bad):
    """The same error (step, role, key) and bitwise the same weights, buffers and optimizer state
    (moments, Adam's step count) as check_finite_every=1, which stops at once."""
    err1, (t1, s1, to1, so1), _ = run_engine(where, bad, 1, make_opt, mode)
    err5, (t5, s5, to5, so5), _ = run_engine(where, bad, 5, make_opt, mode)
    assert (err5.role, err5.step, err5.key) == (err1.role, err1.step, err1.key)
    assert "deferred check" in str(err5)
    for a, b in ((t1, t5), (s1, s5)):
        assert_same_weights(a, b)
    for a, b in ((to1, to5), (so1, so5)):
        assert_same_opt_state(a, b)


def test_without_a_failure_deferred_checks_change_nothing():
    _, (t1, s1, to1, so1), _ = run_engine("none", 0, 1)
    _, (t5, s5, to5, so5), _ = run_engine("none", 0, 5)
    assert_same_weights(t1, t5)
    assert_same_weights(s1, s5)
    assert_same_opt_state(so1, so5)


def test_a_stopped_run_stays_stopped():
    err, _, d = run_engine("student", 3, every=5)
    x, y = make_source().batch(1)
    with pytest.raises(NonFiniteLossError) as again:
        d.step(1, x, y)
    assert again.value is err
    with pytest.raises(NonFiniteLossError):
        d.state_dict()


class Drifting(InMemorySource):
    def batch(self, key):
        x, y = super().batch(key)
        return (x + 1e-6, y) if key == 4 else (x, y)


def test_deferred_replay_mismatch_names_the_key_and_trains_nothing_from_it():
    base = make_source()
    results = []
    for every in (1, 5):
        src = Drifting(base.x, base.y, 8, seed=0, noise=0.1)
        teacher, student = make_pair(0)
        d = SpacedDistiller(teacher, student, fused_sgd(teacher), fused_sgd(student),
                            steps_per_epoch=L, interval_rate=INTERVAL_RATE, loss=ref_kd_loss,
                            source=src, check_finite_every=every)
        with pytest.raises(ReplayMismatchError, match="key 4") as err:
            for key, (x, y) in src.epochs(2):
                d.step(key, x, y)
        results.append((err.value, student, d.student_opt))
    (e1, s1, o1), (e5, s5, o5) = results
    assert e5.key == e1.key == 4 and e5.expected == e1.expected and e5.got == e1.got
    assert_same_weights(s1, s5)
    assert_same_opt_state(o1, o5)


def test_self_distiller_deferred_equals_the_every_step_check():
    out = []
    for every in (1, 4):
        torch.manual_seed(0)
        inner = TinyMultiExit()
        calls = {"n": 0}

        def nan_late(module, args, output, calls=calls):
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == 13:
                    return output[0], [z * float("nan") for z in output[1]]
            return output

        inner.register_forward_hook(nan_late)
        # fused AdamW: torch's fused SGD with momentum fails when some parameters (the
        # adapters, used by KD steps only) get their first gradient later than others
        opt = fused_adamw(inner)
        src = make_source()
        d = SelfDistiller(inner, opt, mode="spaced-self", interval_rate=1.0, steps_per_epoch=L,
                          source=src, check_finite_every=every)
        with pytest.raises(NonFiniteLossError) as err:
            for key, (x, y) in src.epochs(3):
                d.step(key, x, y)
            d.finish()
        out.append((err.value, inner, opt))
    (e1, m1, o1), (e4, m4, o4) = out
    assert (e4.role, e4.step, e4.key) == (e1.role, e1.step, e1.key)
    assert_same_weights(m1, m4)
    assert_same_opt_state(o1, o4)


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
             torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.equal}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["spaced", "online"])
def test_no_host_read_between_deferred_checks(mode):
    """Host reads (source excluded) happen only when the flag is read: every 5 updates."""
    teacher, student = make_pair(0)
    src = make_source()
    batches = list(src.epochs(1))
    d = SpacedDistiller(teacher, student, fused_sgd(teacher), fused_sgd(student), mode=mode,
                        interval_rate=INTERVAL_RATE, steps_per_epoch=L, loss=ref_kd_loss,
                        source=src, check_finite_every=5)
    reads = []
    flag_reads = 0
    real_read = type(d._deferred).read

    def counting_read(self):
        nonlocal flag_reads
        flag_reads += bool(self.checks)
        return real_read(self)

    type(d._deferred).read = counting_read
    try:
        for key, (x, y) in batches:
            with HostReads() as mode_:
                d.step(key, x, y)
            reads.append(mode_.count)
    finally:
        type(d._deferred).read = real_read
    assert sum(reads) == flag_reads  # one float per read of the flag, nothing else
    # spaced: 7 teacher updates (no replay in epoch 1), read at 5 and at the epoch end;
    # online: 2 updates per step, read at 6, 10 and at the epoch end (14)
    assert flag_reads == {"spaced": 2, "online": 3}[mode]


def test_options_that_cannot_be_deferred_are_refused():
    teacher, student = make_pair(0)
    plain = torch.optim.SGD(student.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fused optimizer.*fused=True"):
        SpacedDistiller(teacher, student, fused_sgd(teacher), plain, steps_per_epoch=L,
                        check_finite_every=5)
    with pytest.raises(ValueError, match="grad_scaler"):
        SpacedDistiller(teacher, student, fused_sgd(teacher), fused_sgd(student),
                        steps_per_epoch=L, check_finite_every=5,
                        grad_scaler=torch.amp.GradScaler("cpu"))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="check_finite_every must be a positive integer"):
            SpacedDistiller(teacher, student, fused_sgd(teacher), fused_sgd(student),
                            steps_per_epoch=L, check_finite_every=bad)
    # check_finite=False: nothing is checked, so any optimizer is fine
    SpacedDistiller(teacher, student, fused_sgd(teacher), plain, steps_per_epoch=L,
                    check_finite=False, check_finite_every=5)


def test_deferred_run_writes_the_same_trace(tmp_path):
    """A trace still reads its checksums each step; the trace is that of check_finite_every=1."""
    texts = []
    for every in (1, 5):
        teacher, student = make_pair(0)
        src = make_source()
        path = tmp_path / f"trace{every}.jsonl"
        d = SpacedDistiller(teacher, student, fused_sgd(teacher), fused_sgd(student),
                            interval_rate=INTERVAL_RATE, steps_per_epoch=L, loss=ref_kd_loss,
                            source=src, trace=path, check_finite_every=every)
        for key, (x, y) in src.epochs(2):
            d.step(key, x, y)
        d.finish()
        texts.append(path.read_text())
    assert texts[0] == texts[1] and "student_step" in texts[0]


def test_a_user_error_inside_a_deferred_step_puts_the_buffers_back():
    torch.manual_seed(0)
    teacher, student = make_pair(0)
    student.fc = torch.nn.Linear(6, 4).to(torch.float64)  # 4 classes against the teacher's 5
    t0, s0 = copy.deepcopy(teacher), copy.deepcopy(student)
    d = SpacedDistiller(teacher, student, fused_sgd(teacher), fused_sgd(student), mode="online",
                        steps_per_epoch=L, loss=ref_kd_loss, check_finite_every=5)
    x, y = make_source().batch(1)
    with pytest.raises(ValueError, match="same shape"):
        d.step(1, x, y % 4)
    assert_same_weights(teacher, t0)
    assert_same_weights(student, s0)
