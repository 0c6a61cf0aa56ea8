"""A run interrupted in the middle of an interval and resumed from state dicts produces the same
trace and bitwise the same weights as one that was not interrupted (CPU)."""

import copy

import pytest
import torch
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    BETA,
    TinyMultiExit,
    assert_same_weights,
    full_and_resumed,
    make_pair,
    make_source,
    one_thread,
    ref_kd_loss,
    sgd,
)

from spacedkd_fast.engine.distill import SelfDistiller, SpacedDistiller

EPOCHS = 5


def build(seed, trace, keyed, mode):
    src = make_source()
    teacher, student = make_pair(seed)
    t_opt, s_opt = sgd(teacher), sgd(student)
    d = SpacedDistiller(teacher, student, t_opt, s_opt, mode=mode, interval_rate=1.5,
                        steps_per_epoch=7, loss=ref_kd_loss, beta=BETA, feature_loss=torch.dist,
                        trace=trace, source=src if keyed else None)
    return src, teacher, student, t_opt, s_opt, d


@pytest.mark.parametrize("stop_at", [14, 20], ids=["mid-interval", "at-boundary"])
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "copy"])
@pytest.mark.parametrize("mode", ["spaced", "offline"])
def test_resume_gives_the_same_trace_and_weights(tmp_path, keyed, stop_at, mode):
    full_trace, resumed_trace = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    src, teacher, student, _, _, d = build(0, full_trace, keyed, mode)
    for key, (x, y) in src.epochs(EPOCHS):
        d.step(key, x, y)
    d.finish()

    # interrupted run: stop after `stop_at` steps, keep only what a checkpoint would keep
    src, t1, s1, t_opt1, s_opt1, d1 = build(0, resumed_trace, keyed, mode)
    batches = list(src.epochs(EPOCHS))
    for key, (x, y) in batches[:stop_at]:
        d1.step(key, x, y)
    if stop_at == 14:
        assert len(d1.replay_buffer) == (4 if mode == "spaced" else 14)
    ckpt = copy.deepcopy({
        "teacher": t1.state_dict(), "student": s1.state_dict(),
        "t_opt": t_opt1.state_dict(), "s_opt": s_opt1.state_dict(), "engine": d1.state_dict()})
    for key, (x, y) in batches[stop_at:stop_at + 3]:  # work after the checkpoint is lost
        d1.step(key, x, y)
    d1.close()
    del t1, s1, d1

    # resume in a "new process": different initial weights, everything comes from the checkpoint
    src, t2, s2, t_opt2, s_opt2, d2 = build(123, resumed_trace, keyed, mode)
    t2.load_state_dict(ckpt["teacher"])
    s2.load_state_dict(ckpt["student"])
    d2.load_state_dict(ckpt["engine"])  # before the student optimizer: projector param group
    t_opt2.load_state_dict(ckpt["t_opt"])
    s_opt2.load_state_dict(ckpt["s_opt"])
    for key, (x, y) in batches[stop_at:]:
        d2.step(key, x, y)
    d2.finish()

    assert resumed_trace.read_text() == full_trace.read_text()
    assert_same_weights(s2, student)
    assert_same_weights(t2, teacher)
    assert_same_weights(d2.projector, d.projector)
    assert (d2.teacher_steps, d2.student_steps) == (d.teacher_steps, d.student_steps) == (35, 35)


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    *_, d = build(0, None, True, "spaced")
    state = d.state_dict()
    state["interval_rate"] = 4.0
    with pytest.raises(ValueError, match="interval_rate"):
        d.load_state_dict(state)
    state = d.state_dict()
    state["mode"] = "online"
    with pytest.raises(ValueError, match="mode"):
        d.load_state_dict(state)


def test_self_distiller_resume(tmp_path):
    def build_self(seed, trace):
        torch.manual_seed(seed)
        model = TinyMultiExit()
        opt = sgd(model)
        return model, opt, SelfDistiller(model, opt, mode="spaced-self", interval_rate=1.5,
                                         kd_scale=1.0, steps_per_epoch=7, trace=trace, source=make_source())

    pytest.importorskip("spacedkd_fast.ops.losses")
    batches = list(make_source().epochs(EPOCHS))
    ref, m2 = full_and_resumed(build_self, batches, 13, 7, tmp_path)
    assert_same_weights(m2, ref)
