"""Exact schedules read back from the trace, for awkward numbers: L = 7 (50 samples, batch 8, a last
batch of 2), 5 epochs = 35 steps, s = 1.5 (I = 10), 0.5 (I = 3), 4 (I = 28), with and without
flush_tail, for every two-model mode. The expected sequences are written out by hand here, not
computed with spacedkd_fast.engine.spacing."""

import pytest
import torch
from helpers.toys import make_pair, make_source, one_thread, ref_kd_loss, sgd  # noqa: F401

from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.trace import read_trace

STEPS = 35


def run(tmp_path, mode, rate=1.5, flush_tail=True, keyed=True):
    src = make_source()
    assert src.steps_per_epoch == 7
    teacher, student = make_pair(0)
    path = tmp_path / "trace.jsonl"
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode=mode,
                        interval_rate=rate, steps_per_epoch=7, loss=ref_kd_loss, beta=0.0,
                        flush_tail=flush_tail, trace=path, source=src if keyed else None)
    for key, (x, y) in src.epochs(5):
        d.step(key, x, y)
    d.finish()
    return compress(read_trace(path)), read_trace(path), d


def compress(events):
    out = []
    for e in events:
        kind = e["event"]
        if kind == "teacher_step":
            assert e["n"] == e["key"] and e["epoch"] == (e["key"] - 1) // 7
            out.append(("T", e["key"]))
        elif kind == "student_step":
            out.append(("S", e["key"], e["teacher_step"]))
        elif kind in ("replay_start", "replay_end"):
            tag = "R" if kind == "replay_start" else "E"
            out.append((tag, e["teacher_step"], e["count"], e["reason"]))
        elif kind == "flush":
            out.append(("F", e["replayed"], e["dropped"]))
        else:
            raise AssertionError(f"unknown event {e}")
    return out


def spaced_expected(boundaries, flush_tail):
    out, last = [], 0
    for n in range(1, STEPS + 1):
        out.append(("T", n))
        if n in boundaries:
            keys = list(range(last + 1, n + 1))
            out.append(("R", n, len(keys), "interval"))
            out += [("S", k, n) for k in keys]
            out.append(("E", n, len(keys), "interval"))
            last = n
    tail = list(range(last + 1, STEPS + 1))
    if tail:
        out.append(("F", len(tail) if flush_tail else 0, 0 if flush_tail else len(tail)))
        if flush_tail:
            out.append(("R", STEPS, len(tail), "flush"))
            out += [("S", k, STEPS) for k in tail]
            out.append(("E", STEPS, len(tail), "flush"))
    return out


# the boundaries, worked out by hand: I = int(7 * s)
CASES = {
    1.5: [10, 20, 30],
    0.5: [3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33],
    4.0: [28],
}


@pytest.mark.parametrize("flush_tail", [True, False], ids=["flush", "drop"])
@pytest.mark.parametrize("rate", sorted(CASES))
def test_spaced_schedule(tmp_path, rate, flush_tail):
    got, events, d = run(tmp_path, "spaced", rate, flush_tail)
    assert got == spaced_expected(CASES[rate], flush_tail)
    student_ns = [e["n"] for e in events if e["event"] == "student_step"]
    assert student_ns == list(range(1, len(student_ns) + 1))
    tail = STEPS - CASES[rate][-1]
    assert d.student_steps == (STEPS if flush_tail else STEPS - tail)


def test_spaced_schedule_is_the_same_with_copy_replay(tmp_path):
    keyed, _, _ = run(tmp_path, "spaced", 1.5, keyed=True)
    copied, _, _ = run(tmp_path, "spaced", 1.5, keyed=False)
    assert keyed == copied


def test_online_schedule(tmp_path):
    got, _, _ = run(tmp_path, "online")
    want = []
    for n in range(1, STEPS + 1):
        want += [("T", n), ("S", n, n - 1)]  # soft targets from the weights before step n
    assert got == want


@pytest.mark.parametrize("flush_tail", [True, False])
def test_offline_schedule(tmp_path, flush_tail):
    got, _, _ = run(tmp_path, "offline", 1.5, flush_tail)  # flush_tail does not apply offline
    want = [("T", n) for n in range(1, STEPS + 1)]
    want.append(("R", STEPS, STEPS, "offline"))
    want += [("S", k, STEPS) for k in range(1, STEPS + 1)]
    want.append(("E", STEPS, STEPS, "offline"))
    assert got == want


def test_base_schedule(tmp_path):
    src = make_source()
    _, student = make_pair(0)
    path = tmp_path / "trace.jsonl"
    d = SpacedDistiller(None, student, None, sgd(student), mode="base", steps_per_epoch=7,
                        trace=path)
    for key, (x, y) in src.epochs(5):
        d.step(key, x, y)
    d.finish()
    assert compress(read_trace(path)) == [("S", n, None) for n in range(1, STEPS + 1)]


def test_schedule_uses_step_count_not_key_values(tmp_path):
    """Keys are names; the schedule counts batches. String keys work with CopyReplay."""
    src = make_source()
    teacher, student = make_pair(0)
    path = tmp_path / "trace.jsonl"
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), interval_rate=1.5,
                        steps_per_epoch=7, loss=ref_kd_loss, trace=path)
    for key, (x, y) in src.epochs(2):
        d.step(f"batch-{key}", x, y)
    d.finish()
    students = [e["key"] for e in read_trace(path) if e["event"] == "student_step"]
    assert students == [f"batch-{k}" for k in range(1, 15)]
    assert torch.isfinite(student.fc.weight).all()
