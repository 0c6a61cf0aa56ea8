"""Learning-rate schedules: the per-epoch schedule against timm's CosineLRScheduler (the official ViT
code's scheduler) and the measured official values; the per-step warm-up from a start rate."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from spacedkd_fast.train.lr_schedule import EpochSchedule, StepSchedule, build_schedule


def _opt(lr: float = 123.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _official_cfg(**over):
    values = dict(schedule="cosine", lr=5e-4, epochs=300, warmup_epochs=20, warmup_per="epoch",
                  warmup_start_factor=0.001, min_lr=5e-6, milestones=[], gamma=0.1)
    values.update(over)
    return SimpleNamespace(**values)


def _timm_per_epoch(epochs: int, **kw) -> list[float]:
    """The rate of each epoch from timm's scheduler, stepped once per epoch as the official trainer
    does (constructed, then ``step(e + 1)`` at the end of epoch ``e``)."""
    from timm.scheduler import CosineLRScheduler

    opt = _opt(kw.pop("base_lr"))
    sched = CosineLRScheduler(opt, **kw)
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        sched.step(e + 1)
    return out


@pytest.mark.parametrize("steps_per_epoch", [1, 7])
def test_per_epoch_cosine_equals_timm_stepped_per_epoch(steps_per_epoch):
    want = _timm_per_epoch(300, base_lr=5e-4, t_initial=300, lr_min=5e-6, warmup_t=20,
                           warmup_lr_init=5e-4 * 0.001, warmup_prefix=False)
    opt = _opt()
    sched = build_schedule(opt, _official_cfg(), steps_per_epoch)
    assert isinstance(sched, EpochSchedule)
    got = []
    for _ in range(300):
        rates = []
        for _ in range(steps_per_epoch):  # the rate is constant within an epoch
            rates.append(opt.param_groups[0]["lr"])
            sched.step()
        assert len(set(rates)) == 1
        got.append(rates[0])
    assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_per_epoch_values_measured_from_the_official_code():
    # OFFICIAL_VIT_FACTS.md section 1.5: AdamW schedule per epoch
    measured = {0: 5.0e-7, 1: 2.5475e-5, 10: 2.5025e-4, 19: 4.75025e-4, 20: 4.9459e-4,
                150: 2.525e-4, 299: 5.0136e-6}
    sched = build_schedule(_opt(), _official_cfg(), 390)
    for epoch, lr in measured.items():
        assert sched.lr_at_epoch(epoch) == pytest.approx(lr, rel=1e-4)


def test_set_epoch_pins_the_clock_and_state_restores():
    opt = _opt()
    sched = build_schedule(opt, _official_cfg(), 10)
    for _ in range(25):  # a spaced student lagging behind: 2.5 epochs of its own steps
        sched.step()
    assert sched.epoch == 2
    sched.set_epoch(5)  # the main loop's epoch decides, as in the official code
    for _ in range(30):
        sched.step()
    assert sched.epoch == 5 and opt.param_groups[0]["lr"] == sched.lr_at_epoch(5)
    fresh = build_schedule(_opt(), _official_cfg(), 10)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.optimizer.param_groups[0]["lr"] == sched.lr_at_epoch(5) and fresh.t == 55
    sched.set_epoch(None)  # back on its own clock: 55 steps = epoch 5 of 10 steps
    sched.step()
    assert sched.epoch == 5 and sched.state_dict() == {"t": 56, "epoch": None}


def test_per_epoch_constant_and_multistep_after_a_warmup():
    c = build_schedule(_opt(), _official_cfg(schedule="constant", warmup_epochs=2,
                                             warmup_start_factor=None, lr=1.0), 1)
    assert [c.lr_at_epoch(e) for e in range(4)] == [0.0, 0.5, 1.0, 1.0]
    m = build_schedule(_opt(), _official_cfg(schedule="multistep", warmup_epochs=0, lr=1.0,
                                             milestones=[3.0, 5.0]), 1)
    assert [m.lr_at_epoch(e) for e in range(7)] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_per_epoch_warmup_needs_whole_epochs():
    with pytest.raises(ValueError, match="whole number of epochs"):
        build_schedule(_opt(), _official_cfg(warmup_epochs=2.5), 10)


def test_per_step_warmup_from_a_start_rate():
    cfg = _official_cfg(warmup_per="step", epochs=4, warmup_epochs=1, lr=1.0, min_lr=0.0,
                        warmup_start_factor=0.1)
    sched = build_schedule(_opt(), cfg, 5)
    assert isinstance(sched, StepSchedule)
    got = [sched.lr_at(t) for t in range(21)]
    want = [0.1 + 0.9 * t / 5 if t < 5 else 0.5 * (1 + math.cos(math.pi * (t - 5) / 15))
            for t in range(21)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_per_step_without_a_start_rate_keeps_the_old_warmup():
    cfg = _official_cfg(warmup_per="step", epochs=4, warmup_epochs=1, lr=1.0,
                        warmup_start_factor=None)
    new = build_schedule(_opt(), cfg, 5)
    old = StepSchedule(_opt(), kind="cosine", peak_lr=1.0, total_steps=20, warmup_steps=5,
                       min_lr=5e-6)
    assert [new.lr_at(t) for t in range(21)] == [old.lr_at(t) for t in range(21)]
