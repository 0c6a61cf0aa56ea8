"""CUDA: check_finite_every = N > 1 with the overlap lanes, and no host sync between reads.

Written without a GPU at hand (see the engine's report): these run under gpu_check.sh."""

import pytest
import torch
from helpers.toys import (
    NaNOnCall,
    TinyNet,
    assert_same_weights,
    first_nonfinite,
    fused_sgd,
    ref_kd_loss,
)

from spacedkd_fast.data.memory import InMemorySource
from spacedkd_fast.engine import deferred_checks
from spacedkd_fast.engine.distill import SpacedDistiller

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

IN_DIM = 64


def run(overlap, every, bad=0, keyed=True, epochs=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, IN_DIM, generator=g).cuda()
    y = torch.randint(0, 10, (2000,), generator=g).cuda()
    src = InMemorySource(x, y, 256, seed=0, noise=0.05)
    torch.manual_seed(0)
    teacher = TinyNet(512, classes=10, in_dim=IN_DIM, dtype=torch.float32).cuda()
    student = TinyNet(256, classes=10, in_dim=IN_DIM, dtype=torch.float32).cuda()
    d = SpacedDistiller(teacher, NaNOnCall(student, bad), fused_sgd(teacher), fused_sgd(student),
                        mode="spaced", interval_rate=1.5, steps_per_epoch=src.steps_per_epoch,
                        loss=ref_kd_loss, overlap=overlap, source=src if keyed else None,
                        check_finite_every=every)
    err = first_nonfinite(d, src.epochs(epochs))
    torch.cuda.synchronize()
    return err, teacher, student, d


def test_overlap_with_deferred_checks_equals_sequential_every_step_check():
    _, t1, s1, _ = run(False, 1)
    _, t16, s16, d = run(True, 16)
    assert d.overlap
    assert_same_weights(s16, s1)
    assert_same_weights(t16, t1)


def test_overlap_with_deferred_checks_stops_at_the_first_bad_student_step():
    err1, _, s1, _ = run(False, 1, bad=11)
    err16, t16, s16, _ = run(True, 16, bad=11)
    assert (err16.role, err16.step, err16.key) == (err1.role, err1.step, err1.key)
    assert_same_weights(s16, s1)  # the student lane: that step and every later one skipped
    # the teacher lane may have taken finite steps that the sequential order would not have
    assert all(torch.isfinite(p).all() for p in t16.parameters())


def test_no_host_sync_between_reads(monkeypatch):
    """Copy replay (no source reads): every CUDA sync outside the flag's read is an error."""
    real_read = deferred_checks.DeferredChecks.read

    def read_allowed(self):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_read(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(deferred_checks.DeferredChecks, "read", read_allowed)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, IN_DIM, generator=g).cuda()
    y = torch.randint(0, 10, (2000,), generator=g).cuda()
    src = InMemorySource(x, y, 256, seed=0, noise=0.05)
    batches = list(src.epochs(2))  # drawn before the sync check
    torch.manual_seed(0)
    teacher = TinyNet(512, classes=10, in_dim=IN_DIM, dtype=torch.float32).cuda()
    student = TinyNet(256, classes=10, in_dim=IN_DIM, dtype=torch.float32).cuda()
    d = SpacedDistiller(teacher, student, fused_sgd(teacher), fused_sgd(student), mode="spaced",
                        interval_rate=1.5, steps_per_epoch=src.steps_per_epoch, loss=ref_kd_loss,
                        source=None, check_finite_every=8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for key, (xb, yb) in batches:
            d.step(key, xb, yb)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    d.finish()
