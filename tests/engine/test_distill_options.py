"""SpacedDistiller options: learning-rate schedulers, autocast, a distilled-ViT style student with
(class, distillation) heads, and the student-epoch callback in online mode."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.toys import (  # noqa: F401 (one_thread is an autouse fixture)
    DTYPE,
    TinyNet,
    make_pair,
    make_source,
    one_thread,
    ref_kd_loss,
    sgd,
)

from spacedkd_fast.engine.distill import SpacedDistiller
from spacedkd_fast.engine.trace import read_trace


def test_schedulers_step_after_each_optimizer_step():
    src = make_source()
    teacher, student = make_pair(0)
    t_opt, s_opt = sgd(teacher), sgd(student)
    t_sched = torch.optim.lr_scheduler.StepLR(t_opt, step_size=1000)
    s_sched = torch.optim.lr_scheduler.StepLR(s_opt, step_size=1000)
    d = SpacedDistiller(teacher, student, t_opt, s_opt, steps_per_epoch=7, loss=ref_kd_loss,
                        source=src, teacher_scheduler=t_sched, student_scheduler=s_sched)
    for key, (x, y) in src.epochs(2):
        d.step(key, x, y)
    assert t_sched.last_epoch == 14 and s_sched.last_epoch == 10  # one replay of 10 so far
    d.finish()
    assert s_sched.last_epoch == 14


def test_bfloat16_autocast_runs_and_replays_faithfully(tmp_path):
    src = make_source()
    src.x = src.x.float()
    torch.manual_seed(0)
    teacher = TinyNet(10, dtype=torch.float32)
    student = TinyNet(6, dtype=torch.float32)
    path = tmp_path / "t.jsonl"
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), steps_per_epoch=7,
                        loss=ref_kd_loss, beta=0.03, source=src, amp_dtype=torch.bfloat16,
                        trace=path)
    for key, (x, y) in src.epochs(2):
        d.step(key, x, y)
    d.finish()
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert student.fc.weight.dtype == torch.float32  # autocast, not a cast of the weights
    events = read_trace(path)
    recorded = {e["key"]: e["checksum"] for e in events if e["event"] == "teacher_step"}
    assert all(e["checksum"] == recorded[e["key"]] for e in events
               if e["event"] == "student_step")


class TwoHeads(torch.nn.Module):
    """A distilled-ViT style student: (features, (class logits, distillation logits))."""

    def __init__(self):
        super().__init__()
        self.body = TinyNet(6, features=True)
        self.dist = torch.nn.Linear(6, 5).to(DTYPE)
        self.feature_dim = None

    def forward(self, x):
        f, z = self.body(x)
        return f, (z, self.dist(f))


def _heads_of_pair(model, x):
    _, (cls, dist) = model(x)
    return cls, dist


def _heads_of_attribute(model, x):
    _, cls = model(x)
    return cls, model.distill_logits


def _check_ce_on_class_head_and_kd_on_distillation_head(student, heads):
    """One online step of the engine against the same step by hand: CE on the class head,
    KL(q || p) on the distillation head."""
    losses = pytest.importorskip("spacedkd_fast.ops.objective")
    src = make_source()
    teacher = TinyNet(10)
    ref, t_ref = copy.deepcopy(student), copy.deepcopy(teacher)
    kd = losses.KDLoss(temperature=3.0, alpha=0.3, kd_scale=1.0)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="online",
                        steps_per_epoch=7, loss=kd)
    x, y = src.batch(1)
    d.step(1, x, y)
    t_z = t_ref(x)[1].detach()
    cls, dist = heads(ref, x)
    kl = F.kl_div(F.log_softmax(dist / 3.0, 1), F.softmax(t_z / 3.0, 1), reduction="batchmean")
    loss = 0.7 * F.cross_entropy(cls, y) + 0.3 * kl
    opt = sgd(ref)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for a, b in zip(student.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_class_and_distillation_heads_get_ce_and_kd_respectively():
    torch.manual_seed(0)
    _check_ce_on_class_head_and_kd_on_distillation_head(TwoHeads(), _heads_of_pair)


def test_online_student_epochs():
    seen = []
    src = make_source()
    teacher, student = make_pair(0)
    d = SpacedDistiller(teacher, student, sgd(teacher), sgd(student), mode="online",
                        steps_per_epoch=7, loss=ref_kd_loss, on_student_epoch_end=seen.append)
    for key, (x, y) in src.epochs(3):
        d.step(key, x, y)
    d.finish()
    assert seen == [1, 2, 3]


class DistillAttr(torch.nn.Module):
    """The official DeiT convention: train mode returns the class head; the distillation head of
    the same forward is kept in ``distill_logits``."""

    def __init__(self):
        super().__init__()
        self.body = TinyNet(6, features=True)
        self.dist = torch.nn.Linear(6, 5).to(DTYPE)
        self.feature_dim = None
        self.distill_logits = None

    def forward(self, x):
        f, z = self.body(x)
        self.distill_logits = self.dist(f) if self.training else None
        return f, (z if self.training else (z + self.dist(f)) / 2)


def test_distill_logits_attribute_gets_the_kd_term():
    torch.manual_seed(0)
    _check_ce_on_class_head_and_kd_on_distillation_head(DistillAttr(), _heads_of_attribute)
