"""Fault tests of the cluster recipe on CPU with gloo: the README's cluster command (2 processes
under ``python -m spacedkd_fast.train.torchrun --max-restarts 1``, ``--resume auto``,
``--checkpoint-every``) on tiny digits runs (12 steps per epoch, 2 epochs).

- a + d. A worker is SIGKILLed mid-epoch at the moment rank 0 writes a checkpoint: torchrun
  restarts the job, which resumes by itself from the last complete checkpoint and ends bitwise
  equal to the uninterrupted 2-process run (weights, optimisers, both ranks' traces).
- b. SIGTERM to the agent: every rank stops after the same step, rank 0 writes one checkpoint,
  the exit status is 143, and the re-run of the same command ends bitwise equal to the reference.
- c. The 2-process checkpoint of b resumed with 1 process, and a 1-process checkpoint resumed with
  2: the keys and the step schedule stay those of the reference, every rank trains on its rows of
  the same global batches (checksums against batches regenerated here), replays verify, and the
  runs finish.
- e. Another world size is accepted (c); another configuration, another package version and a
  configuration this version cannot read: tests/train/test_resume_auto.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import spacedkd_fast
from spacedkd_fast.engine.trace import batch_checksum, read_trace
from spacedkd_fast.train import faults
from spacedkd_fast.train.checkpoint import CHECKPOINT_NAME, load_checkpoint

L, EPOCHS, BATCH = 12, 2, 128  # digits training split (1438 images) at global batch 128
DATA = ["--dataset", "digits", "--image-size", "8", "--augment", "none", "--model-kwargs",
        "downsample_factor=64", "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--lr",
        "0.05", "--device", "cpu", "--log-every", "4", "--no-progress", "--interval-rate", "1.5"]
# the README's cluster command, on the tiny data above; relative paths, so that a copied folder
# is the same command's folder
TRAIN = ["-m", "spacedkd_fast.train", *DATA, "--out", "run", "--trace", "run/trace.jsonl",
         "--resume", "auto", "--checkpoint-every", "4"]
LAUNCH = [sys.executable, "-m", "spacedkd_fast.train.torchrun", "--standalone",
          "--nproc-per-node", "2", "--max-restarts", "1"]
PACKAGE_PARENT = str(Path(spacedkd_fast.__file__).resolve().parents[1])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}
ENV.pop("SPACEDKD_FAULT", None)
TIMEOUT = 240


def launch(folder: Path, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*LAUNCH, *TRAIN], env={**ENV, **env}, cwd=folder, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def in_process(folder: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The same trainer command with 1 process, run in this process."""
    from spacedkd_fast.train.cli import main

    monkeypatch.chdir(folder)
    status = main(TRAIN[2:])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def teacher_steps(path: Path) -> int:
    if not path.exists():
        return 0
    return sum('"teacher_step"' in line for line in path.read_text().splitlines())


def schedule(events: list[dict]) -> list[tuple]:
    return [(e["event"], e.get("key"), e.get("teacher_step")) for e in events
            if e["event"] in ("teacher_step", "student_step", "replay_start")]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["finished"] and sb["finished"]
    for role in ("teacher", "student"):
        for k, v in sa["models"][role].items():
            assert torch.equal(v, sb["models"][role][k]), f"{role}.{k} differs"
        oa, ob = sa["optimizers"][role]["state"], sb["optimizers"][role]["state"]
        assert oa.keys() == ob.keys()
        for k in oa:
            assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])
    for k, v in sa["engine"][0]["projector"].items():
        assert torch.equal(v, sb["engine"][0]["projector"][k])


def share_checksums(rank: int, world: int) -> dict[int, list[float]]:
    """Every key's checksum of rank ``rank``'s rows of the global batch, regenerated here."""
    from spacedkd_fast.data import build_data

    source = build_data("digits", batch_size=BATCH, image_size=8, recipe="none", seed=0,
                        rank=rank, world_size=world).train
    return {key: batch_checksum(*source.batch(key)).tolist()
            for key in range(1, EPOCHS * L + 1)}


def assert_rows_of_the_global_batch(events: list[dict], rank: int, world: int, after: int) -> None:
    """From the resume after global step ``after`` on (the events from its next teacher step),
    every step and every replay of this rank, the replays of batches recorded before the resume
    included, trained on rank ``rank``'s rows (of ``world``) of the same global batches."""
    expected = share_checksums(rank, world)
    first = next(i for i, e in enumerate(events)
                 if e["event"] == "teacher_step" and e["key"] > after)
    resumed = [e for e in events[first:] if e["event"] in ("teacher_step", "student_step")]
    assert any(e["event"] == "student_step" and e["key"] <= after for e in resumed), \
        "no replay of a batch recorded before the resume: the test misses the rebuilt records"
    for e in resumed:
        assert e["checksum"] == expected[e["key"]], e


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted 2-process run: the cluster command in an empty folder starts it."""
    folder = tmp_path_factory.mktemp("reference")
    done = launch(folder)
    assert "x 2 processes" in done.stdout and "resuming" not in done.stdout
    return folder


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """The cluster command stopped by SIGTERM to the agent a few steps into epoch 2; the folder
    and an untouched copy of it."""
    folder = tmp_path_factory.mktemp("sigterm")
    proc = subprocess.Popen([*LAUNCH, *TRAIN], env=ENV, cwd=folder, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + TIMEOUT
    while teacher_steps(folder / "run" / "trace.jsonl") < L + 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the run ended or stalled before step {L + 2}: {proc.communicate()[0]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    copy = tmp_path_factory.mktemp("sigterm-copy")
    shutil.copytree(folder / "run", copy / "run")
    return folder, copy, subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_a_d_worker_killed_while_rank0_writes_a_mid_epoch_checkpoint_restarts_and_resumes(
        tmp_path, reference):
    # rank 1 SIGKILLs itself at the checkpoint after step 16 (epoch 2, step 4), once every rank's
    # state is gathered: rank 0 is writing the file; on the first attempt only
    done = launch(tmp_path, SPACEDKD_FAULT="1:save=14")
    text = done.stdout + done.stderr
    assert "exitcode: -9" in text  # the worker died of SIGKILL and torchrun restarted the job
    assert text.count("resuming after epoch 1") == 1
    # the checkpoint the restart found was complete: the one rank 0 was writing (step 4 of epoch
    # 2) or, had the kill come first, the previous one (end of epoch 1)
    assert ("resuming after epoch 1, step 4 of epoch 2" in text
            or "resuming after epoch 1\n" in text), text
    assert_same_weights(reference / "run", tmp_path / "run")
    for name in ("trace.jsonl", "trace.jsonl.rank1"):
        assert (tmp_path / "run" / name).read_text() == (reference / "run" / name).read_text()
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_b_sigterm_to_the_agent_stops_every_rank_at_one_step_and_resumes_exactly(
        sigterm_run, reference):
    folder, _, stopped = sigterm_run
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    assert stopped.stdout.count("interrupted (SIGTERM): state saved") == 1  # rank 0 alone
    state = load_checkpoint(folder / "run")
    at = state["epoch"] * L + state["step_in_epoch"]
    assert not state["finished"] and L + 2 <= at < EPOCHS * L
    # one consistent checkpoint: both ranks' engines after the same step, as their traces
    assert [e["n"] for e in state["engine"]] == [at, at]
    run = folder / "run"
    assert teacher_steps(run / "trace.jsonl") == teacher_steps(run / "trace.jsonl.rank1") == at
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [CHECKPOINT_NAME]

    done = launch(folder)  # the same command again
    assert f"resuming after epoch {state['epoch']}" in done.stdout
    assert_same_weights(reference / "run", run)
    for name in ("trace.jsonl", "trace.jsonl.rank1"):
        assert (run / name).read_text() == (reference / "run" / name).read_text()


def test_c_a_two_process_checkpoint_resumed_with_one_process(sigterm_run, reference,
                                                             monkeypatch, capsys):
    _, copy, _ = sigterm_run
    state = load_checkpoint(copy / "run")
    at = state["epoch"] * L + state["step_in_epoch"]
    status, text = in_process(copy, monkeypatch, capsys)
    assert status == 0, text
    assert "written by 2 process(es), this run has 1" in text
    events = read_trace(copy / "run" / "trace.jsonl")
    assert schedule(events) == schedule(read_trace(reference / "run" / "trace.jsonl"))
    assert_rows_of_the_global_batch(events, 0, 1, after=at)
    assert load_checkpoint(copy / "run")["finished"]


def test_c_a_one_process_checkpoint_resumed_with_two(tmp_path, reference, monkeypatch, capsys):
    stop_at = L + 5

    def sigterm_at(where, key):  # the scheduler's SIGTERM, at a chosen step
        if where == "step" and key == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(faults, "point", sigterm_at)
    status, text = in_process(tmp_path, monkeypatch, capsys)
    monkeypatch.undo()
    assert status == 143, text
    state = load_checkpoint(tmp_path / "run")
    assert state["epoch"] * L + state["step_in_epoch"] == stop_at and len(state["engine"]) == 1

    done = launch(tmp_path)
    assert "written by 1 process(es), this run has 2" in done.stdout
    assert load_checkpoint(tmp_path / "run")["finished"]
    ref0 = read_trace(reference / "run" / "trace.jsonl")
    ref1 = read_trace(reference / "run" / "trace.jsonl.rank1")
    rank0 = read_trace(tmp_path / "run" / "trace.jsonl")
    rank1 = read_trace(tmp_path / "run" / "trace.jsonl.rank1")  # a new rank: from the resume on
    assert schedule(rank0) == schedule(ref0)
    assert schedule(rank1) == schedule(ref1)[-len(schedule(rank1)):]
    assert rank1[0]["event"] != "teacher_step" or rank1[0]["key"] == stop_at + 1
    for rank, events in ((0, rank0), (1, rank1)):
        assert_rows_of_the_global_batch(events, rank, 2, after=stop_at)


def test_the_readme_cluster_example_is_this_command():
    path = Path(__file__).resolve().parents[2] / "README.md"
    if not path.exists():
        pytest.skip("README.md is not beside the tests (an installed copy)")
    readme = path.read_text()
    block = readme[readme.index("<!-- cluster-example -->"):]
    block = block[:block.index("```", block.index("```") + 3)]
    command = " ".join(block.replace("\\\n", " ").split())
    assert "python -m spacedkd_fast.train.torchrun" in command
    assert "--max-restarts" in command and "-m spacedkd_fast.train" in command
    assert "--resume auto --checkpoint-every" in command
