"""Checkpoints: atomic writes, clear errors for missing/corrupt files, RNG round trips, schedules."""

from __future__ import annotations

import fractions
import os
import pickle
import random
import re

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


# no internal exception names in what the user reads (KeyError: 101, BadZipFile, ...)
EXCEPTION_NAME = re.compile(r"\b\w*(Error|Exception|BadZipFile)\b")


def _refusal(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(folder)
    text = str(info.value)
    assert str(folder / CHECKPOINT_NAME) in text  # names the file
    assert "\n" not in text and not EXCEPTION_NAME.search(text), text
    return text


def _damaged_zip(tmp_path) -> bytes:
    save_checkpoint(tmp_path, _payload(models={"student": {"w": torch.randn(100, 100)}}))
    return (tmp_path / CHECKPOINT_NAME).read_bytes()


def test_a_truncated_checkpoint_says_truncated(tmp_path):
    data = _damaged_zip(tmp_path)
    (tmp_path / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    assert f"is truncated: a PyTorch file cut short at {len(data) // 2} bytes" in _refusal(tmp_path)


def test_flipped_bytes_inside_a_complete_checkpoint_say_damaged(tmp_path):
    data = bytearray(_damaged_zip(tmp_path))
    at = data.index(b"format")  # inside the pickled payload, the zip's directory intact
    data[at:at + 6] = b"\xff\x00\x13\x99\x01\x02"
    (tmp_path / CHECKPOINT_NAME).write_bytes(bytes(data))
    assert "is damaged: a PyTorch file" in _refusal(tmp_path)


def test_a_text_file_is_named_as_one(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_text("epoch: 3\nnot really a checkpoint\n")
    text = _refusal(tmp_path)
    assert "is a text file (it begins 'epoch: 3'), not a checkpoint of this package" in text
    assert "corrupt" not in text and "after the run wrote it" not in text


@pytest.mark.parametrize("content, says", [
    (b"", "is empty (0 bytes), not a checkpoint"),
    (bytes(range(256)) * 8, "is not a checkpoint of this package: not a PyTorch file"),
    (pickle.dumps({"epoch": 1}, protocol=4), "is a pickle in an old PyTorch format"),
])
def test_files_that_are_no_pytorch_checkpoint_say_what_they_are(tmp_path, content, says):
    (tmp_path / CHECKPOINT_NAME).write_bytes(content)
    assert says in _refusal(tmp_path)


def test_foreign_pytorch_files_are_refused_naming_what_they_hold(tmp_path):
    torch.save({"state_dict": {}, "arch": "resnet18"}, tmp_path / CHECKPOINT_NAME)
    assert "holds a model's weights only (a best_student.pt)" in _refusal(tmp_path)
    torch.save({"w": torch.zeros(2)}, tmp_path / CHECKPOINT_NAME)
    assert "holds a model's state_dict, not a training checkpoint" in _refusal(tmp_path)
    torch.save([1, 2], tmp_path / CHECKPOINT_NAME)
    assert "is a PyTorch file holding a list, not a training checkpoint" in _refusal(tmp_path)
    torch.save({"a": fractions.Fraction(1, 3)}, tmp_path / CHECKPOINT_NAME)
    assert "holds Python objects that a checkpoint of this package never contains" in \
        _refusal(tmp_path)


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


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork to kill a writer mid-write")
def test_a_writer_killed_in_the_middle_of_a_write_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL to a process inside a checkpoint write (its torch.save has put half of the new
    file's bytes on disk): the torn temporary file stays, checkpoint.pt still loads and is the
    previous complete version. The kill lands mid-write by construction, not by timing."""
    import io
    import signal

    from spacedkd_fast.train import checkpoint as ckpt_module

    weights = torch.arange(1_000_000, dtype=torch.float32)
    save_checkpoint(tmp_path, _payload(epoch=0, models={"student": {"w": weights}}))
    newer = _payload(epoch=1, models={"student": {"w": weights + 1}})  # no torch op after fork:
    pid = os.fork()  # a forked child that enters an OpenMP region of the parent's pool hangs
    if pid == 0:  # the writer: half of the next checkpoint's bytes, then the kill
        try:
            real_save = torch.save

            def half_then_die(obj, f):
                buf = io.BytesIO()
                real_save(obj, buf)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            ckpt_module.torch.save = half_then_die  # the child's torch only: it dies here
            save_checkpoint(tmp_path, newer)
        finally:
            os._exit(1)  # never run pytest's own exit code in the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    torn = list(tmp_path.glob(f".{CHECKPOINT_NAME}.tmp-*"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0  # the kill landed inside the write
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 0 and torch.equal(state["models"]["student"]["w"], weights)
