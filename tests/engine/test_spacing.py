"""spacing.py and the mode table: pure arithmetic, checked against numbers worked out by hand
and the SPEC's."""

import math

import pytest

from spacedkd_fast.engine.modes import (
    MODE_NAMES,
    MODES,
    SELF_MODES,
    TWO_MODEL_MODES,
    resolve_mode,
)
from spacedkd_fast.engine.spacing import SpacedSchedule, interval_steps


def test_interval_steps_truncates_like_the_official_code():
    assert interval_steps(7, 1.5) == 10
    assert interval_steps(7, 0.5) == 3  # int(3.5)
    assert interval_steps(7, 4.0) == 28
    assert interval_steps(391, 1.5) == 586  # CIFAR-100, batch 128
    assert interval_steps(391, 4.0) == 1564


@pytest.mark.parametrize("rate", [0.0, -1.0, math.nan])
def test_interval_steps_rejects_non_positive_rates(rate):
    with pytest.raises(ValueError, match="interval_rate"):
        interval_steps(7, rate)


def test_interval_that_truncates_to_zero_is_an_error():
    with pytest.raises(ValueError, match="0 steps"):
        interval_steps(7, 0.1)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_steps_per_epoch(steps):
    with pytest.raises(ValueError, match="steps_per_epoch"):
        interval_steps(steps, 1.5)


def test_official_interval_rate_convention():
    assert resolve_mode("spaced", 0) == "online"
    assert resolve_mode("spaced", 1.5) == "spaced"
    assert resolve_mode("spaced", 49.9) == "spaced"
    assert resolve_mode("spaced", 50) == "offline"
    assert resolve_mode("spaced", 100) == "offline"
    assert resolve_mode("online", 1.5) == "online"  # explicit modes ignore the rate
    assert resolve_mode("base", 0) == "base"
    assert resolve_mode("spaced-self", 0, self_kd=True) == "self"
    assert resolve_mode("spaced-self", 4.0, self_kd=True) == "spaced-self"


@pytest.mark.parametrize("mode", ["spaced", "online", "offline", "base"])
def test_negative_interval_rate_is_rejected_in_every_mode(mode):
    with pytest.raises(ValueError, match="interval_rate must be >= 0"):
        resolve_mode(mode, -0.5)


def test_unknown_modes_and_offline_self_kd_are_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_mode("self", 1.0)  # a self mode on the two-model engine
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_mode("spaced", 1.0, self_kd=True)
    with pytest.raises(ValueError, match="offline"):
        resolve_mode("spaced-self", 60, self_kd=True)


def test_replay_points_interval_and_one_epoch():
    ours = SpacedSchedule.build(7, 1.5)
    assert [n for n in range(1, 36) if ours.replay_due(n)] == [10, 20, 30]
    official = SpacedSchedule.build(7, 1.5, first_replay="one-epoch")
    assert [n for n in range(1, 36) if official.replay_due(n)] == [7, 17, 27]
    with pytest.raises(ValueError, match="first_replay"):
        SpacedSchedule.build(7, 1.5, first_replay="never")


def test_plan_with_and_without_tail():
    sched = SpacedSchedule.build(7, 1.5)
    plan = sched.plan(35, flush_tail=True)
    assert plan == [(10, list(range(1, 11))), (20, list(range(11, 21))),
                    (30, list(range(21, 31))), (35, list(range(31, 36)))]
    assert sched.plan(35, flush_tail=False) == plan[:3]
    assert sched.plan(30, flush_tail=True) == plan[:3]  # no tail when the run ends on a replay
    assert sched.epoch_of(1) == 0 and sched.epoch_of(7) == 0 and sched.epoch_of(8) == 1


def test_spec_numbers_cifar100_80_epochs():
    # SPEC 3 rule 3: the official code drops 222 of 31,280 steps on CIFAR-100 at 80 epochs, s=1.5
    sched = SpacedSchedule.build(391, 1.5)
    plan = sched.plan(391 * 80, flush_tail=False)
    replayed = sum(len(keys) for _, keys in plan)
    assert 391 * 80 == 31_280
    assert 31_280 - replayed == 222
    full = sched.plan(391 * 80, flush_tail=True)
    assert full[-1] == (31_280, list(range(31_280 - 221, 31_281)))


def test_mode_table_names_each_mode_once():
    assert MODE_NAMES == ("base", "online", "spaced", "offline", "frozen", "self", "spaced-self")
    assert set(TWO_MODEL_MODES) | set(SELF_MODES) == set(MODE_NAMES)
    assert not set(TWO_MODEL_MODES) & set(SELF_MODES)
    assert [n for n, m in MODES.items() if m.replays == "interval"] == ["spaced", "spaced-self"]
