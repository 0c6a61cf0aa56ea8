"""Overlap on CPU: the decision, and the lane mechanics driven through a recording fake.

Real overlap needs CUDA streams (tests/engine/test_distill_cuda.py). What the CPU can check
honestly: ``overlap="auto"`` is off here; and with the overlapped code path forced on and the lanes
replaced by a fake that records calls (and runs on the caller's stream, as disabled lanes do), the
student of interval k is issued one step per teacher step of interval k+1, against a snapshot of
the teacher taken at the end of interval k, and the weights equal the sequential order bitwise."""

import pytest
import torch
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    BETA,
    assert_same_weights,
    make_pair,
    make_source,
    one_thread,
    ref_kd_loss,
    sgd,
)

from spacedkd_fast.engine import spaced
from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.overlap import Lanes
from spacedkd_fast.engine.trace import read_trace

EPOCHS = 4


class RecordingLanes(Lanes):
    """Disabled lanes (everything on the caller's stream) that log what the engine asks of them."""

    log: list[str] = []

    def __init__(self, teacher_device, student_device, enabled):
        super().__init__(teacher_device, student_device, enabled=False)
        self.forced = enabled

    def student(self):
        RecordingLanes.log.append("student")
        return super().student()

    def publish_snapshot(self, snapshot, teacher):
        RecordingLanes.log.append("snapshot")
        super().publish_snapshot(snapshot, teacher)

    def mark_student_done(self):
        RecordingLanes.log.append("done")


def run(overlap, trace=None):
    src = make_source()
    teacher, student = make_pair(0)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="spaced",
                        interval_rate=1.5, steps_per_epoch=7, loss=ref_kd_loss, beta=BETA,
                        feature_loss=torch.dist, overlap=overlap, source=src, trace=trace)
    for key, (x, y) in src.epochs(EPOCHS):
        d.step(key, x, y)
    d.finish()
    return teacher, student, d


def test_auto_overlap_is_off_on_cpu_and_forcing_it_is_an_error():
    *_, d = run("auto")
    assert not d.overlap and not d._lanes.enabled
    with pytest.raises(ValueError, match="overlap=True needs"):
        run(True)


@pytest.fixture
def forced_overlap(monkeypatch):
    RecordingLanes.log = []
    monkeypatch.setattr(spaced, "Lanes", RecordingLanes)
    monkeypatch.setattr(SpacedDistiller, "_want_overlap", lambda self, overlap: bool(overlap))
    return RecordingLanes.log


def test_overlapped_order_equals_sequential_bitwise(forced_overlap, tmp_path):
    t_ovl, s_ovl, d_ovl = run(True, trace=tmp_path / "ovl.jsonl")
    assert d_ovl.overlap and d_ovl._snapshot is not None
    t_seq, s_seq, d_seq = run(False, trace=tmp_path / "seq.jsonl")
    assert_same_weights(s_ovl, s_seq)
    assert_same_weights(t_ovl, t_seq)
    assert_same_weights(d_ovl.projector, d_seq.projector)
    assert d_ovl.student_steps == d_seq.student_steps == 28

    # 28 steps, I = 10: snapshots at 10 and 20; the tail 21..28 is flushed sequentially
    assert forced_overlap.count("snapshot") == 2 and forced_overlap.count("done") == 2
    events = read_trace(tmp_path / "ovl.jsonl")
    order = [(e["event"][0], e["key"]) for e in events if e["event"].endswith("_step")]
    # interval 1's student steps are issued one per teacher step of interval 2 ...
    after_10 = order[order.index(("t", 10)) + 1:]
    assert after_10[:6] == [("t", 11), ("s", 1), ("t", 12), ("s", 2), ("t", 13), ("s", 3)]
    # ... against the teacher as it stood at step 10, not the one training beside it
    students = [e for e in events if e["event"] == "student_step"]
    assert [e["teacher_step"] for e in students[:20]] == [10] * 10 + [20] * 10
    seq = [e for e in read_trace(tmp_path / "seq.jsonl") if e["event"] == "student_step"]
    assert [e["checksum"] for e in students] == [e["checksum"] for e in seq]
