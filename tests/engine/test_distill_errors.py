"""Bad input: negative rates, a source that replays a different batch, logits of different
shapes, non-finite losses (clear error naming the step, nothing written over the last good
state), and switches that cannot apply."""

import copy

import pytest
import torch
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    TinyNet,
    assert_same_weights,
    make_pair,
    make_source,
    one_thread,
    ref_kd_loss,
    sgd,
)

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.distill import (
    NonFiniteLossError,
    ReplayMismatchError,
    SelfDistiller,
    SpacedDistiller,
)


def make(mode="spaced", **kw):
    teacher, student = make_pair(0)
    kw.setdefault("loss", ref_kd_loss)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode=mode,
                        steps_per_epoch=7, **kw)
    return teacher, student, d


@pytest.mark.parametrize("rate", [-1.0, -1e-9, float("nan")])
def test_negative_interval_rate(rate):
    with pytest.raises(ValueError, match="interval_rate must be >= 0"):
        make(interval_rate=rate)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="interval_rate must be >= 0"):
        SelfDistiller(model, sgd(model), interval_rate=rate, steps_per_epoch=7)


class _Drifting(InMemorySource):
    """Gives back a different batch for one key (as a source with an unseeded augmentation
    would)."""

    bad_key = 4

    def batch(self, key):
        x, y = super().batch(key)
        return (x + 1e-6, y) if key == self.bad_key else (x, y)


def test_source_that_replays_a_different_batch_is_reported_not_trained_on():
    base = make_source()
    src = _Drifting(base.x, base.y, 8, seed=0, noise=0.1)
    teacher, student, d = make(source=src)
    after_step = []
    opt_step = d.student_opt.step

    def spy_step(*a, **k):
        out = opt_step(*a, **k)
        after_step.append(copy.deepcopy(student.state_dict()))
        return out

    d.student_opt.step = spy_step
    with pytest.raises(ReplayMismatchError, match="key 4") as err:
        for key, (x, y) in src.epochs(2):
            d.step(key, x, y)
    assert err.value.key == 4 and err.value.expected != err.value.got
    assert d.student_steps == 3 and len(after_step) == 3  # keys 1..3 replayed, 4 refused
    assert all(torch.equal(v, after_step[-1][k]) for k, v in student.state_dict().items())


def test_logit_shape_mismatch_is_a_clear_error_before_any_update():
    torch.manual_seed(0)
    teacher, student = TinyNet(10, classes=5), TinyNet(6, classes=4)
    t0, s0 = copy.deepcopy(teacher), copy.deepcopy(student)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="online",
                        steps_per_epoch=7, loss=ref_kd_loss)
    x, y = make_source().batch(1)
    with pytest.raises(ValueError, match=r"same shape.*\(8, 4\).*\(8, 5\)"):
        d.step(1, x, y % 4)
    assert_same_weights(teacher, t0)
    assert_same_weights(student, s0)


def test_non_finite_teacher_loss_names_the_step_and_keeps_the_last_good_weights():
    src = make_source()
    teacher, _, d = make(source=None)
    batches = list(src.epochs(1))
    for key, (x, y) in batches[:4]:
        d.step(key, x, y)
    good = copy.deepcopy(teacher.state_dict())
    key, (x, y) = batches[4]
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="teacher step 5") as err:
        d.step(key, x, y)
    assert err.value.step == 5 and err.value.role == "teacher" and err.value.key == 5
    assert isinstance(err.value, RuntimeError)
    assert all(torch.equal(v, good[k]) for k, v in teacher.state_dict().items())


class _NaNAfter(torch.nn.Module):
    """Wraps a model; its output turns NaN from the ``start``-th call in train mode."""

    def __init__(self, inner, start):
        super().__init__()
        self.inner, self.start, self.calls = inner, start, 0
        self.feature_dim = inner.feature_dim

    def forward(self, x):
        f, z = self.inner(x)
        self.calls += 1
        return (f, z * float("nan")) if self.calls >= self.start else (f, z)


def test_non_finite_student_loss_during_replay():
    src = make_source()
    teacher, inner = make_pair(0)
    student = _NaNAfter(inner, start=3)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), steps_per_epoch=7,
                        interval_rate=1.5, loss=ref_kd_loss, source=src)
    snapshots = []
    opt_step = d.student_opt.step
    d.student_opt.step = lambda *a, **k: (opt_step(*a, **k),
                                          snapshots.append(copy.deepcopy(inner.state_dict())))[0]
    with pytest.raises(NonFiniteLossError, match="student step 3.*teacher step 10") as err:
        for key, (x, y) in src.epochs(2):
            d.step(key, x, y)
    assert err.value.role == "student" and err.value.step == 3 and err.value.key == 3
    assert len(snapshots) == 2
    assert all(torch.equal(v, snapshots[-1][k]) for k, v in inner.state_dict().items())


def test_non_finite_check_can_be_turned_off():
    src = make_source()
    teacher, _, d = make(check_finite=False, source=None)
    key, (x, y) = next(iter(src.epoch(0)))
    x = x.clone()
    x[0, 0] = float("nan")
    d.step(key, x, y)  # no error: the user asked for no check
    assert torch.isnan(teacher.fc.weight).any()


def test_switches_that_cannot_apply():
    with pytest.raises(ValueError, match=r"replay='fresh' needs a source with a second stream"):
        make(replay="fresh")
    with pytest.raises(ValueError, match="replay must be"):
        make(replay="sometimes")
    with pytest.raises(ValueError, match="overlap=True needs"):
        make(overlap=True)  # CPU
    with pytest.raises(ValueError, match="beta"):
        make(beta=-0.1)
    _, student = make_pair(0)
    with pytest.raises(ValueError, match="needs a teacher"):
        SpacedDistiller(None, student, None, sgd(student), mode="spaced", steps_per_epoch=7)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        make(steps_per_epoch=0) if False else SpacedDistiller(
            None, student, None, sgd(student), mode="base", steps_per_epoch=0)
    with pytest.raises(ValueError, match="0 steps"):
        make(interval_rate=0.1)  # int(7 * 0.1) = 0


def test_step_after_finish_is_an_error():
    src = make_source()
    _, _, d = make(source=src)
    key, (x, y) = next(iter(src.epoch(0)))
    d.step(key, x, y)
    d.finish()
    d.finish()  # idempotent
    with pytest.raises(RuntimeError, match="after finish"):
        d.step(key + 1, x, y)


def test_model_output_of_the_wrong_kind():
    class Bad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(6, 5).double()

        def forward(self, x):
            return {"logits": self.w(x)}

    teacher, _ = make_pair(0)
    bad = Bad()
    d = SpacedDistiller(teacher, bad, sgd(teacher), sgd(bad), mode="online", steps_per_epoch=7,
                        loss=ref_kd_loss)
    x, y = make_source().batch(1)
    with pytest.raises(TypeError, match="must return logits"):
        d.step(1, x, y)
