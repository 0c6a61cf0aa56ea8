"""Resume exactness through the real command: SIGKILL mid-epoch, SIGINT (the runs are
subprocesses; the ``--resume`` commands run the same entry point in this process).

On CPU a run killed with SIGKILL in the middle of an epoch and resumed with ``--resume OUT`` ends
with bitwise the same weights, optimiser state, metrics (timing excepted) and trace as an
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import spacedkd_fast
from spacedkd_fast.train.checkpoint import load_checkpoint
from spacedkd_fast.train.report import TIMING_KEYS

L = 12  # digits training split (1438 images) at batch 128
EPOCHS = 2  # the replay at step 18 (s=1.5) takes batches recorded before a resume in epoch 2
ARGS = ["--dataset", "digits", "--image-size", "8", "--augment", "none", "--model-kwargs",
        "downsample_factor=64", "--batch-size", "128", "--epochs", str(EPOCHS), "--lr", "0.05",
        "--device", "cpu", "--log-every", "4", "--no-progress", "--interval-rate", "1.5",
        "--threads", "1"]  # recorded: a resume in this process runs with it too
# Subprocesses import the same spacedkd_fast as this test (installed or checkout) and run in a
# temporary folder, so that the current directory can never shadow it.
PACKAGE_PARENT = str(Path(spacedkd_fast.__file__).resolve().parents[1])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}


def command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "spacedkd_fast.train", *ARGS, *extra]


def start(out: Path, trace: Path) -> subprocess.Popen:
    return subprocess.Popen(command("--out", str(out), "--trace", str(trace)), env=ENV,
                            cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def teacher_steps_in(trace: Path) -> int:
    if not trace.exists():
        return 0
    return sum('"teacher_step"' in line for line in trace.read_text().splitlines())


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_final_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["finished"] and sb["finished"]
    for role in ("teacher", "student"):
        wa, wb = sa["models"][role], sb["models"][role]
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{role}.{k} differs"
        oa, ob = sa["optimizers"][role]["state"], sb["optimizers"][role]["state"]
        assert oa.keys() == ob.keys()
        for k in oa:
            assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])
    assert sa["engine"][0]["projector"] is not None
    for k, v in sa["engine"][0]["projector"].items():
        assert torch.equal(v, sb["engine"][0]["projector"][k])


INTERRUPTS = {"sigkill": (signal.SIGKILL, L + 4),  # a few steps into epoch 2, after checkpoint 1
              "sigint": (signal.SIGINT, L + 3)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str, int]]:
    """The uninterrupted run and the two runs the tests interrupt, as ``name -> (folder, output,
    exit status)``. The three commands start together (each takes one core, and most of its time
    is starting up); each interrupted one gets its signal once its trace reaches its step."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("reference", *INTERRUPTS)}
    procs = {name: start(f / "run", f / "trace.jsonl") for name, f in folders.items()}
    try:
        pending, deadline = dict(INTERRUPTS), time.monotonic() + 180
        while pending:
            for name, (sig, step) in list(pending.items()):
                if teacher_steps_in(folders[name] / "trace.jsonl") >= step:
                    procs[name].send_signal(sig)
                    del pending[name]
                elif procs[name].poll() is not None:
                    pytest.fail(f"the {name} run ended before step {step}: "
                                f"{procs[name].stdout.read()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the runs did not reach their steps in 180 s: {sorted(pending)}")
            time.sleep(0.005)
        done = {name: (folders[name], p.communicate(timeout=120)[0], p.returncode)
                for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert done["reference"][2] == 0, done["reference"][1]
    return done


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    return runs["reference"][0]


def resume(out: Path, capsys) -> tuple[int, str]:
    """``python -m spacedkd_fast.train --resume OUT`` run in this process (with the 1 CPU
    thread the run recorded)."""
    from spacedkd_fast.train.cli import main

    status = main(["--resume", str(out), "--no-progress"])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(runs, reference, capsys):
    folder, _, _ = runs["sigkill"]
    out, trace = folder / "run", folder / "trace.jsonl"
    killed_at = teacher_steps_in(trace)
    state = load_checkpoint(out)
    assert not state["finished"] and state["step_in_epoch"] == 0
    # usually mid-epoch 2; on a slow machine the run may have gone further, never past the end
    assert killed_at >= state["epoch"] * L and state["epoch"] < EPOCHS

    status, text = resume(out, capsys)
    assert status == 0, text
    assert f"resuming after epoch {state['epoch']}" in text
    assert_same_final_state(reference / "run", out)
    assert metrics(out) == metrics(reference / "run")
    assert trace.read_text() == (reference / "trace.jsonl").read_text()


def test_sigint_saves_mid_epoch_and_resume_matches(runs, reference, capsys):
    folder, text, status = runs["sigint"]
    out = folder / "run"
    assert status == 130, text
    assert "interrupted (SIGINT): state saved" in text and f"--resume {out}" in text
    state = load_checkpoint(out)
    assert not state["finished"]
    assert state["epoch"] * L + state["step_in_epoch"] >= L + 3

    status, text = resume(out, capsys)
    assert status == 0, text
    assert_same_final_state(reference / "run", out)
    ours, ref = metrics(out), metrics(reference / "run")
    assert len(ours) == len(ref) == EPOCHS
    for a, b in zip(ours, ref):
        for key in ("teacher_top1", "teacher_top5", "student_top1", "student_top5",
                    "teacher_steps", "student_steps", "lr"):
            assert a[key] == b[key], key
        for key in ("teacher_loss", "student_loss"):
            # an interrupt reads the loss sums once more: same values, other summation order
            assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-9)


def test_resuming_a_finished_run_changes_nothing(tmp_path, reference, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference / "run", out)
    before = (out / "checkpoint.pt").read_bytes()
    status, text = resume(out, capsys)
    assert status == 0, text
    assert "already finished" in text
    assert (out / "checkpoint.pt").read_bytes() == before
