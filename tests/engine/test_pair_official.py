"""``SpacedDistiller(compat="official")`` against naive re-creations of the official online-KD
loop (SPEC sections 2 and 3, written here and in helpers/toys.py, not from the engine).

The official objective is ``(1 - a) CE + a * KLDivLoss(batchmean)(p, q)`` with probabilities
``p = softmax(z_s / T)`` as the input (SPEC section 2); the reference writes it with the same plain
torch ops, so the comparisons are bitwise."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    BETA,
    _student_step,
    _teacher_step,
    _with_projector,
    assert_same_weights,
    batches_of,
    make_pair,
    make_source,
    naive_online,
    naive_spaced,
    one_thread,
    sgd,
)

from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.trace import read_trace
from spacedkd_fast.ops.objective import KDObjective

L, EPOCHS = 7, 5
RATES = [0.5, 1.0, 1.5, 2.0, 4.0]
TEMPERATURE, ALPHA = 4.0, 0.4  # not the package defaults: the preset must use the user's values


def official_kd(s_z, t_z, y):
    p = F.softmax(s_z / TEMPERATURE, dim=1)
    q = F.softmax(t_z / TEMPERATURE, dim=1)
    kl_div = F.kl_div(p, q, reduction="batchmean")  # the official code's call: input = p
    return (1 - ALPHA) * F.cross_entropy(s_z, y) + ALPHA * kl_div


def run(mode, s=1.5, epochs=EPOCHS, trace=None, **kw):
    src = make_source()
    teacher, student = make_pair(0)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode=mode,
                        interval_rate=s, steps_per_epoch=L, beta=BETA, feature_loss=torch.dist,
                        source=src, trace=trace, compat="official", temperature=TEMPERATURE,
                        alpha=ALPHA, **kw)
    for key, (x, y) in src.epochs(epochs):
        d.step(key, x, y)
    d.finish()
    return teacher, student, d


def test_online_preset_equals_the_official_loop_bitwise():
    teacher, student, d = run("online")
    assert d.kd == KDObjective(TEMPERATURE, ALPHA, kind="paper-code")
    t_ref, s_ref = make_pair(0)
    naive_online(t_ref, s_ref, batches_of(make_source(), EPOCHS), kd=official_kd)
    assert_same_weights(student, s_ref)
    assert_same_weights(teacher, t_ref)


@pytest.mark.parametrize("s", RATES)
def test_spaced_preset_equals_the_official_loop_bitwise(s, tmp_path):
    teacher, student, d = run("spaced", s, trace=tmp_path / "t.jsonl")
    interval = int(L * s)
    t_ref, s_ref = make_pair(0)
    naive_spaced(t_ref, s_ref, batches_of(make_source(), EPOCHS), interval=interval,
                 official=True, kd=official_kd)
    assert_same_weights(student, s_ref)
    assert_same_weights(teacher, t_ref)  # BN statistics updated by the replays, as officially
    assert d.student_steps == EPOCHS * L // interval * interval  # the tail is dropped
    starts = [e for e in read_trace(tmp_path / "t.jsonl") if e["event"] == "replay_start"]
    assert [e["teacher_step"] for e in starts] == list(range(interval, EPOCHS * L + 1, interval))
    assert {e["rule"] for e in starts} == {"n % I == 0"}


def test_interval_that_truncates_to_zero_runs_online_under_the_preset():
    with pytest.warns(UserWarning, match="= 0 steps: running 'online'"):
        teacher, student, d = run("spaced", 0.1)
    assert d.mode == "online"
    t_ref, s_ref = make_pair(0)
    naive_online(t_ref, s_ref, batches_of(make_source(), EPOCHS), kd=official_kd)
    assert_same_weights(student, s_ref)
    with pytest.raises(ValueError, match=r"smallest valid interval_rate is 1/7"):
        teacher, student = make_pair(0)
        SpacedDistiller(teacher, student, sgd(teacher), sgd(student), interval_rate=0.1,
                        steps_per_epoch=L)  # ours: a clear error


def official_offline_loop(teacher, student, epochs):
    """Teacher for ``epochs`` epochs, then the student for as many on new passes of the loader
    (reshuffled, re-noised: the source's next epochs), teacher in eval mode."""
    src = make_source()
    t_opt = sgd(teacher)
    s_opt, proj = _with_projector(student, teacher, BETA)
    teacher.train()
    for e in range(epochs):
        for _, (x, y) in src.epoch(e):
            _teacher_step(teacher, t_opt, x, y)
    teacher.eval()
    student.train()
    for e in range(epochs, 2 * epochs):
        for _, (x, y) in src.epoch(e):
            with torch.no_grad():
                t_f, t_z = teacher(x)
            _student_step(student, proj, s_opt, x, y, t_f, t_z, BETA, official_kd)


def test_offline_preset_trains_the_student_on_fresh_passes_bitwise(tmp_path):
    teacher, student, d = run("offline", epochs=3, trace=tmp_path / "t.jsonl")
    t_ref, s_ref = make_pair(0)
    official_offline_loop(t_ref, s_ref, 3)
    assert_same_weights(student, s_ref)
    assert_same_weights(teacher, t_ref)
    keys = [e["key"] for e in read_trace(tmp_path / "t.jsonl") if e["event"] == "student_step"]
    assert keys == list(range(3 * L + 1, 6 * L + 1))  # epochs 3..5 of the source
    assert teacher.training  # its own mode is restored after the eval-mode phase


def test_preset_contradictions_are_clear_errors():
    teacher, student = make_pair(0)

    def make(**kw):
        return SpacedDistiller(teacher, student, sgd(teacher), sgd(student), steps_per_epoch=L,
                               compat="official", **kw)

    with pytest.raises(ValueError, match="compat='official' sets teacher_bn_update=True"):
        make(teacher_bn_update=False)
    with pytest.raises(ValueError, match="contradicts"):
        make(loss=KDObjective())  # the fused KL is not the official objective
    with pytest.raises(ValueError, match="kind='paper-code'"):
        make(loss=lambda s, t, y: s.sum())
    with pytest.raises(ValueError, match="compat must be one of"):
        SpacedDistiller(teacher, student, sgd(teacher), sgd(student), steps_per_epoch=L,
                        compat="offical")
    with pytest.raises(ValueError, match="offline_student_data='fresh' trains the student on new"):
        make(mode="offline")  # copies cannot give new passes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = make(loss=KDObjective(TEMPERATURE, ALPHA, kind="paper-code"))  # the official form
    assert d.teacher_bn_update and not d.flush_tail
