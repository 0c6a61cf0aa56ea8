"""CUDA: overlapped teacher/student work (two streams, or two GPUs) equals the sequential order.

The models here are wide enough (hidden 512, batch 256) that kernels take long enough for a
missing wait to show up as a different result; the comparison is bitwise (same kernels, same
inputs, same order within each model's stream)."""

import pytest
import torch
import torch.nn.functional as F
from helpers.toys import TinyNet, assert_same_weights, ref_kd_loss, sgd

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.trace import read_trace

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

IN_DIM = 64


def make_source(device, n=2000, batch=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, IN_DIM, generator=g).to(device)
    y = torch.randint(0, 10, (n,), generator=g).to(device)
    return InMemorySource(x, y, batch, seed=0, noise=0.05)


def run(overlap, *, keyed=True, epochs=4, trace=None, teacher_device="cuda",
        student_device="cuda", dtype=torch.float32, check_finite=True):
    src = make_source(teacher_device)
    torch.manual_seed(0)
    teacher = TinyNet(512, classes=10, in_dim=IN_DIM, dtype=dtype).to(teacher_device)
    student = TinyNet(256, classes=10, in_dim=IN_DIM, dtype=dtype).to(student_device)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="spaced",
                        interval_rate=1.5, steps_per_epoch=src.steps_per_epoch, loss=ref_kd_loss,
                        beta=0.03, feature_loss=torch.dist, overlap=overlap, trace=trace,
                        source=src if keyed else None, check_finite=check_finite)
    for key, (x, y) in src.epochs(epochs):
        d.step(key, x.to(dtype), y)
    d.finish()
    torch.cuda.synchronize()
    return teacher, student, d


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "copy"])
@pytest.mark.parametrize("check_finite", [True, False], ids=["checked", "unchecked"])
def test_overlap_equals_sequential_bitwise(keyed, check_finite):
    t_seq, s_seq, d_seq = run(False, keyed=keyed, check_finite=check_finite)
    t_ovl, s_ovl, d_ovl = run(True, keyed=keyed, check_finite=check_finite)
    assert d_ovl.overlap and not d_seq.overlap
    assert_same_weights(s_ovl, s_seq)
    assert_same_weights(t_ovl, t_seq)
    assert_same_weights(d_ovl.projector, d_seq.projector)
    assert d_ovl.student_steps == d_seq.student_steps == 4 * 8


def test_overlap_trace_fidelity_and_soft_target_teacher(tmp_path):
    path = tmp_path / "t.jsonl"
    run(True, trace=path)
    events = read_trace(path)
    recorded = {e["key"]: e["checksum"] for e in events if e["event"] == "teacher_step"}
    students = [e for e in events if e["event"] == "student_step"]
    assert [e["n"] for e in students] == list(range(1, 33))
    interval = int(8 * 1.5)
    for e in students:
        assert e["checksum"] == recorded[e["key"]]
        boundary = -(-e["key"] // interval) * interval  # the interval's last teacher step
        assert e["teacher_step"] == min(boundary, 32)


def test_auto_overlap_is_on_for_cuda_spaced_and_equals_overlap_off(tmp_path):
    """``auto``: on for CUDA spaced KD without a host read before every step (here the check is
    off; a deferred check counts the same), off with the every-step read, where it does not pay."""
    _, _, d_read = run("auto", epochs=1)
    assert not d_read.overlap
    _, s_auto, d = run("auto", epochs=2, trace=tmp_path / "auto.jsonl", check_finite=False)
    assert d.overlap and d._lanes.enabled
    assert d._lanes.student_stream != d._lanes.teacher_stream  # a second stream did the work
    stats = d.pop_stats()
    assert stats["student_loss"] > 0 and stats["teacher_loss"] > 0
    _, s_off, d_off = run(False, epochs=2, check_finite=False)
    assert not d_off.overlap
    assert_same_weights(s_auto, s_off)
    # the student of interval 1 (teacher steps 1..12) was issued while the teacher trained on
    # interval 2: one student step after each of teacher steps 13..
    order = [(e["event"][0], e["key"]) for e in read_trace(tmp_path / "auto.jsonl")
             if e["event"].endswith("_step")]
    after_12 = order[order.index(("t", 12)) + 1:]
    assert after_12[:4] == [("t", 13), ("s", 1), ("t", 14), ("s", 2)]


def test_replay_teacher_bn_untouched_with_overlap():
    t_ovl, _, _ = run(True)
    src = make_source("cuda")
    torch.manual_seed(0)
    alone = TinyNet(512, classes=10, in_dim=IN_DIM, dtype=torch.float32).cuda()
    opt = sgd(alone)
    for _, (x, y) in src.epochs(4):
        loss = F.cross_entropy(alone(x)[1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_same_weights(t_ovl, alone)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_devices_equal_sequential():
    t_seq, s_seq, _ = run(False, teacher_device="cuda:0", student_device="cuda:1")
    t_ovl, s_ovl, d = run(True, teacher_device="cuda:0", student_device="cuda:1")
    assert d.overlap
    assert_same_weights(s_ovl, s_seq)
    assert_same_weights(t_ovl, t_seq)
