"""A run's life beyond one command: resume with the saved flags, extend with --epochs, groups of
seeds, SIGTERM from a scheduler."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import run, tiny_config

import spacedkd_fast
from spacedkd_fast.train import runner, seeds
from spacedkd_fast.train.checkpoint import load_checkpoint
from spacedkd_fast.train.report import TIMING_KEYS


def rows_of(folder: Path) -> list[dict]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_extending_a_finished_run_equals_training_that_long_from_the_start(tmp_path,
                                                                            digits_bundle):
    short = tiny_config(tmp_path, mode="online", epochs=1, out=str(tmp_path / "short"))
    assert run(short, data=digits_bundle)[0] == 0
    stream = io.StringIO()
    # flags equal to the saved values are accepted; --epochs extends
    status = runner.resume(tmp_path / "short", overrides={"epochs": "2", "lr": "0.05",
                                                          "mode": "online"},
                           progress=False, data=digits_bundle, stream=stream)
    assert status == 0, stream.getvalue()
    assert "extending the run from 1 to 2 epochs" in stream.getvalue()
    assert "re-planned" not in stream.getvalue()  # a constant rate needs no new plan
    straight = tiny_config(tmp_path, mode="online", epochs=2, out=str(tmp_path / "straight"))
    assert run(straight, data=digits_bundle)[0] == 0
    a, b = load_checkpoint(tmp_path / "short"), load_checkpoint(tmp_path / "straight")
    assert a["finished"] and a["config"]["epochs"] == 2
    for role in ("teacher", "student"):
        for k, v in a["models"][role].items():
            assert torch.equal(v, b["models"][role][k]), (role, k)
    assert rows_of(tmp_path / "short") == rows_of(tmp_path / "straight")
    assert yaml.safe_load((tmp_path / "short/config.yaml").read_text())["epochs"] == 2


def test_resume_plan_replans_schedules_that_depend_on_the_total(tmp_path):
    cfg = tiny_config(tmp_path, mode="spaced", epochs=2, schedule="cosine")
    state = {"config": cfg.to_dict(), "epoch": 2, "finished": True,
             "engine": [{"finished": True}], "metrics": [{"lr": 0.0123}]}
    new, notes = runner.resume_plan(state, tmp_path / "run", {"epochs": 4})
    assert new.epochs == 4
    assert notes[0] == "extending the run from 2 to 4 epochs"
    # spaced KD: the finished run's end of training handled its tail; the user is told
    assert "differs from one planned for 4 epochs from the start" in notes[1]
    assert notes[2:] == ["the cosine learning-rate schedule is re-planned for 4 epochs from "
                         "epoch 3 on (lr was 0.0123 after epoch 2)"]
    assert state["finished"] is False and state["engine"][0]["finished"] is False


def test_a_group_of_seeds_trains_each_seed_in_its_own_resumable_folder(tmp_path, digits_bundle):
    cfg = tiny_config(tmp_path, mode="base", epochs=1, seeds="0,1", out=str(tmp_path / "group"))
    stream = io.StringIO()
    assert seeds.train_group(cfg, progress=False, data=digits_bundle, stream=stream) == 0
    group = tmp_path / "group"
    assert seeds.is_group(group) and not seeds.is_group(group / "seed0")
    weights = []
    for s in (0, 1):
        member = group / f"seed{s}"
        saved = yaml.safe_load((member / "config.yaml").read_text())
        assert (saved["seed"], saved["seeds"], saved["out"]) == (s, "", str(member))
        state = load_checkpoint(member)
        assert state["finished"] and len(rows_of(member)) == 1
        weights.append(state["models"]["student"])
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # continuing the group: finished members are skipped, a missing one is trained
    import shutil

    shutil.rmtree(group / "seed1")
    stream = io.StringIO()
    assert seeds.resume_group(group, progress=False, data=digits_bundle, stream=stream) == 0
    assert "seed 0: already finished" in stream.getvalue()
    assert torch.equal(load_checkpoint(group / "seed1")["models"]["student"][next(iter(weights[1]))],
                       weights[1][next(iter(weights[1]))])


# ---------------------------------------------------------------------------- SIGTERM
PACKAGE_PARENT = str(Path(spacedkd_fast.__file__).resolve().parents[1])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}


def test_sigterm_saves_and_exits_143_with_the_resume_command(tmp_path):
    out, trace = tmp_path / "run", tmp_path / "trace.jsonl"
    cmd = [sys.executable, "-m", "spacedkd_fast.train", "--dataset", "digits", "--image-size", "8",
           "--augment", "none", "--model-kwargs", "downsample_factor=64", "--batch-size", "128",
           "--epochs", "3", "--device", "cpu", "--no-progress", "--out", str(out), "--trace",
           str(trace)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while not trace.exists() or trace.read_text().count('"teacher_step"') < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"run ended or stalled before step 3: {proc.communicate()[0]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, text
    assert "interrupted (SIGTERM): state saved" in text and f"--resume {out}" in text
    assert "Traceback" not in text
    state = load_checkpoint(out)
    assert not state["finished"] and state["epoch"] * 12 + state["step_in_epoch"] >= 3
