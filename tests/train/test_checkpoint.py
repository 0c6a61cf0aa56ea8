"""Checkpoints: atomic writes, clear errors for missing/corrupt files, RNG round trips, schedules."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from spacedkd_fast.train.checkpoint import (
    CHECKPOINT_NAME,
    REQUIRED_KEYS,
    CheckpointError,
    atomic_save,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from spacedkd_fast.train.lr_schedule import StepSchedule


def _payload(**extra):
    base = {k: {} for k in REQUIRED_KEYS if k not in ("format", "version")}
    base.update(config={"mode": "spaced"}, epoch=1, step_in_epoch=0, metrics=[],
                rng=[rng_state()], engine=[{"n": 3}])
    base.update(extra)
    return base


def test_save_then_load_round_trip(tmp_path):
    w = torch.randn(5, 3)
    save_checkpoint(tmp_path, _payload(models={"student": {"w": w}}))
    state = load_checkpoint(tmp_path)
    assert torch.equal(state["models"]["student"]["w"], w)
    assert state["engine"][0]["n"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temporary left


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _payload(epoch=1))

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _payload(epoch=2))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_atomic_save_replaces_in_one_rename(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append((a, b)), real_replace(a, b)))
    atomic_save({"a": 1}, tmp_path / "x.pt")
    assert len(calls) == 1 and str(calls[0][1]).endswith("x.pt") and ".tmp-" in str(calls[0][0])


def test_missing_folder_and_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    save_checkpoint(tmp_path, _payload(models={"student": {"w": torch.randn(100, 100)}}))
    path = tmp_path / CHECKPOINT_NAME
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(2000),
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path)


def test_foreign_file_is_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="not a spacedkd_fast training checkpoint"):
        load_checkpoint(tmp_path)


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(tmp_path, _payload(rng=[rng_state()]))
    expected = (torch.rand(4), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(tmp_path)["rng"][0])
    got = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def _lrs(schedule: StepSchedule, steps: int) -> list[float]:
    out = [schedule.optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        schedule.step()
        out.append(schedule.optimizer.param_groups[0]["lr"])
    return out


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)


def test_cosine_with_warmup_matches_closed_form():
    import math

    s = StepSchedule(_opt(), kind="cosine", peak_lr=0.5, total_steps=20, warmup_steps=4, min_lr=0.01)
    got = _lrs(s, 20)
    want = [0.5 * (t + 1) / 4 if t < 4 else
            0.01 + 0.49 * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16)) for t in range(21)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[-1] == pytest.approx(0.01)


def test_multistep_and_constant():
    s = StepSchedule(_opt(), kind="multistep", peak_lr=1.0, total_steps=10, milestones=[3, 6],
                     gamma=0.1)
    assert _lrs(s, 7) == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01])
    c = StepSchedule(_opt(), kind="constant", peak_lr=0.01, total_steps=10)
    assert _lrs(c, 3) == [0.01] * 4


def test_a_param_group_added_later_follows_the_schedule_and_state_restores():
    opt = _opt()
    s = StepSchedule(opt, kind="cosine", peak_lr=1.0, total_steps=10)
    s.step()
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 7.0})
    s.step()
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"] == s.lr_at(2)
    fresh = StepSchedule(_opt(), kind="cosine", peak_lr=1.0, total_steps=10)
    fresh.load_state_dict(s.state_dict())
    assert fresh.optimizer.param_groups[0]["lr"] == s.lr_at(2)


def test_other_format_version_names_both_versions(tmp_path):
    payload = _payload()
    payload.update(format="spacedkd_fast-checkpoint", version=0, spacedkd_fast="0.0.1")
    atomic_save(payload, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"format version 0 \(written by spacedkd_fast "
                                              r"0\.0\.1\); spacedkd_fast .* reads version 1"):
        load_checkpoint(tmp_path)
