"""Every way a user can make ``python -m spacedkd_fast.train`` fail ends in one line and a status:
2 for bad input (each ``raise`` of the configuration and runner code), 4 for a file that cannot be
written; never a traceback. Unreadable checkpoints are always a ``CheckpointError`` (fuzzed)."""

from __future__ import annotations

import errno
import io
import os
import random

import pytest
import torch
from run_helpers import run, tiny_config

from spacedkd_fast.train import checkpoint as ckpt
from spacedkd_fast.train.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from spacedkd_fast.train.cli import main
from spacedkd_fast.train.errors import EXIT_WRITE_FAILED

HAS_CUDA = torch.cuda.is_available()


# ---------------------------------------------------------------------------- checkpoints
def test_unreadable_checkpoints_are_always_a_checkpoint_error(tmp_path):
    """1,000 seeded damaged files: random bytes of random length, and truncations of a real
    checkpoint at random points; every one is a CheckpointError, nothing else."""
    good = tmp_path / "good"
    good.mkdir()
    ckpt.save_checkpoint(good, {k: {} for k in ckpt.REQUIRED_KEYS if k not in ("format", "version")}
                         | {"config": {"mode": "spaced"}, "epoch": 1, "step_in_epoch": 0,
                            "metrics": [], "rng": [], "engine": [],
                            "models": {"student": {"w": torch.randn(8, 8)}}})
    data = (good / CHECKPOINT_NAME).read_bytes()
    assert load_checkpoint(good)["epoch"] == 1
    rng = random.Random(1234)
    folder = tmp_path / "bad"
    folder.mkdir()
    path = folder / CHECKPOINT_NAME
    kinds = {"random": 0, "truncated": 0}
    for i in range(1000):
        if i % 2:
            blob = rng.randbytes(rng.randrange(0, 3000))
            kinds["random"] += 1
        else:
            blob = data[: rng.randrange(0, len(data))]
            kinds["truncated"] += 1
        path.write_bytes(blob)
        try:
            load_checkpoint(folder)
        except CheckpointError:
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"file {i} ({len(blob)} bytes) raised {type(err).__name__}: {err}")
        pytest.fail(f"file {i} ({len(blob)} bytes) loaded as a checkpoint")
    assert kinds == {"random": 500, "truncated": 500}


# ---------------------------------------------------------------------------- CLI, exit 2
def cli(capsys, *args) -> tuple[int, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def assert_one_line_error(status: int, text: str, needle: str) -> None:
    assert status == 2, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert needle in text, text


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_bundle):
    """A finished 1-epoch online run (for the resume cases)."""
    folder = tmp_path_factory.mktemp("done")
    cfg = tiny_config(folder, mode="online", epochs=1)
    assert run(cfg, data=digits_bundle)[0] == 0
    return folder / "run"


RUNNER_CASES = [
    # (arguments, a piece of the message); "{out}" is a fresh folder, "{run}" the finished run
    pytest.param(["--device", "cuda", "--dataset", "digits"], "no CUDA device is available",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="a GPU is present"), id="no-cuda"),
    pytest.param(["--device", "cuda:64", "--dataset", "digits"], "CUDA device",
                 id="cuda-index"),
    pytest.param(["--device", "tpu9", "--dataset", "digits"], "--device tpu9", id="device-name"),
    pytest.param(["--device", "cpu", "--amp", "fp16", "--dataset", "digits"], "use --amp bf16",
                 id="fp16-on-cpu"),
    pytest.param(["--dataset", "mnist", "--device", "cpu"], "mnist", id="unknown-dataset"),
    pytest.param(["--dataset", "cifar100", "--data-dir", "{out}/none", "--device", "cpu"],
                 "cifar-100-python", id="dataset-missing"),
    pytest.param(["--arch", "resnet7", "--dataset", "digits", "--device", "cpu"],
                 "unknown model 'resnet7'", id="unknown-arch"),
    pytest.param(["--dataset", "digits", "--device", "cpu", "--out", "{out}/file/sub"],
                 "cannot write there", id="unwritable-out"),
    pytest.param(["--dataset", "digits", "--device", "cpu", "--out", "{run}"],
                 "already holds a run", id="existing-run"),
    pytest.param(["--dataset", "digits", "--device", "cpu", "--mode", "spaced",
                  "--interval-rate", "0.01"], "interval", id="interval-too-small"),
    pytest.param(["--resume", "{out}/nowhere"], "is not a folder", id="resume-no-folder"),
    pytest.param(["--resume", "{out}"], "no checkpoint in", id="resume-no-checkpoint"),
    pytest.param(["--resume", "{out}/corrupt"], "not a checkpoint of this package",
                 id="resume-corrupt"),
    pytest.param(["--resume", "{run}", "--lr", "0.1"],
                 "--lr (saved 0.05, given 0.1) cannot change on resume", id="resume-changed-flag"),
    pytest.param(["--resume", "{run}", "--config", "cifar100-resnet18-online"], "drop --config",
                 id="resume-with-config"),
    pytest.param(["--resume", "{run}", "--epochs", "1", "--mode", "spaced"], "--mode",
                 id="resume-changed-mode"),
    pytest.param(["--resume", "{out}/shorter"], "not shorten", id="resume-shorter"),
    pytest.param(["--resume", "{out}/ws2"], "holds the state of 1 (it is inconsistent)",
                 id="resume-world-size"),
    pytest.param(["--resume", "{out}/misfit"], "do not fit what spacedkd_fast",
                 id="resume-misfit"),
    pytest.param(["--resume", "{out}/v0"], "format version 0", id="resume-version"),
    pytest.param(["--resume", "{out}/lacks"], "lacks rng", id="resume-lacks"),
    pytest.param(["--resume", "{out}/types"], "engine of the wrong type", id="resume-types"),
    pytest.param(["--resume", "{out}/offline", "--epochs", "2"], "offline run cannot be extended",
                 id="resume-extend-offline"),
    pytest.param(["--device", "meta", "--dataset", "digits"], "unsupported device type",
                 id="device-type"),
    pytest.param(["--seeds", "0,1", "--dataset", "digits", "--device", "cpu", "--out",
                  "{out}/file/group"], "cannot write there", id="seeds-unwritable"),
    # configuration code
    pytest.param(["--lr", "abc"], "lr: cannot use 'abc'", id="config-type"),
    pytest.param(["--epochs", "0"], "epochs must be greater than zero", id="config-range"),
    pytest.param(["--alpha", "2"], "alpha must lie in [0, 1]", id="config-alpha"),
    pytest.param(["--config", "no-such-recipe"], "not found", id="config-recipe"),
    pytest.param(["--config", "{out}/bad.yaml"], "is not valid YAML", id="config-yaml"),
    pytest.param(["--config", "{out}/list.yaml"], "must hold a mapping", id="config-mapping"),
    pytest.param(["--config", "{out}/unknown.yaml"], "unknown setting 'lrr'", id="config-key"),
    pytest.param(["--seeds", "a,b"], "seeds must be", id="config-seeds"),
    pytest.param(["--schedule", "multistep"], "needs --milestones", id="config-multistep"),
    pytest.param(["--mode", "base", "--teacher-arch", "resnet18"], "mode base trains one model",
                 id="config-base-teacher"),
    pytest.param(["--mode", "frozen", "--teacher-checkpoint", "t.pt", "--feature-kd", "inter",
                  "--inter-student-blocks", "0", "--inter-teacher-blocks", "0",
                  "--teacher-features", "precomputed", "--dataset", "digits", "--device", "cpu"],
                 "has no teacher logits: use --alpha 0", id="config-precomputed-logits"),
    pytest.param(["--mode", "frozen", "--teacher-checkpoint", "missing.pt", "--dataset", "digits",
                  "--device", "cpu"], "teacher-checkpoint missing.pt: no such file",
                 id="teacher-checkpoint-missing"),
    pytest.param(["--mode", "frozen", "--teacher-checkpoint", "{out}/notes.txt", "--dataset",
                  "digits", "--device", "cpu"],
                 "notes.txt is a text file (it begins 'not a checkpoint'), not a checkpoint of "
                 "this package", id="teacher-checkpoint-text"),
    pytest.param(["--compat", "official", "--flush-tail", "--dataset", "digits", "--device",
                  "cpu"], "sets flush_tail=False; drop flush_tail=True or use --compat none", id="compat-contradicted"),
]


def damaged(run_folder, folder, change) -> None:
    """A copy of ``run_folder`` whose checkpoint payload went through ``change``."""
    import shutil

    shutil.copytree(run_folder, folder)
    state = torch.load(folder / CHECKPOINT_NAME, weights_only=True)
    change(state)
    ckpt.atomic_save(state, folder / CHECKPOINT_NAME)


@pytest.mark.parametrize("args, needle", RUNNER_CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, finished_run, args, needle):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / CHECKPOINT_NAME).write_bytes(os.urandom(64))
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "unknown.yaml").write_text("lrr: 0.1\n")
    if "{out}/shorter" in args:  # a run planned for 3 epochs asked to stop after 2
        damaged(finished_run, tmp_path / "shorter", lambda s: s["config"].update(epochs=3))
        args = [*args, "--epochs", "2"]
    changes = {"ws2": lambda s: s.update(world_size=2),
               "misfit": lambda s: s["models"].update(student={"w": torch.zeros(1)}),
               "v0": lambda s: s.update(version=0), "lacks": lambda s: s.pop("rng"),
               "types": lambda s: s.update(engine={}),
               "offline": lambda s: s["config"].update(mode="offline")}
    for name, change in changes.items():
        if "{out}/" + name in args:
            damaged(finished_run, tmp_path / name, change)
    args = [a.replace("{out}", str(tmp_path)).replace("{run}", str(finished_run)) for a in args]
    fresh_out = "--out" not in args and "--resume" not in args
    if fresh_out:
        args += ["--out", str(tmp_path / "o")]
    status, text = cli(capsys, *args)
    assert_one_line_error(status, text, needle)
    if fresh_out:  # a refused run leaves no (empty) output folder behind
        assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- failed writes
def test_a_failed_checkpoint_write_names_the_file_and_space_and_keeps_the_last_one(
        tmp_path, digits_bundle, monkeypatch, capsys):
    real_save = torch.save
    calls = {"n": 0}

    def disk_fills_up(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", ""))
        if CHECKPOINT_NAME in name:
            calls["n"] += 1
            if calls["n"] == 2:  # the end of epoch 2: half written, then the disk is full
                f.write(b"PK\x03\x04 partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    cfg = tiny_config(tmp_path, mode="base", epochs=2)
    stream = io.StringIO()
    from spacedkd_fast.train import runner

    status = runner.train(cfg, progress=False, data=digits_bundle, stream=stream)
    err = capsys.readouterr().err
    assert status == EXIT_WRITE_FAILED
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    path = tmp_path / "run" / CHECKPOINT_NAME
    assert f"cannot write {path}: No space left on device (needs " in err
    assert " MB free on that filesystem" in err and "--resume" in err
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run")["epoch"] == 1  # the last good one
    assert not list((tmp_path / "run").glob(".*tmp*"))  # no partial file left behind


def test_a_failed_write_through_the_cli_exits_4_without_traceback(tmp_path, monkeypatch, capsys):
    def no_permission(obj, path):
        raise ckpt.WriteError(f"cannot write {path}: Permission denied (needs 1.0 MB, 2.0 MB free "
                              "on that filesystem); the previous version of the file is kept")

    from spacedkd_fast.train import history

    monkeypatch.setattr(history, "save_best_student", lambda out, **kw: no_permission(None, out))
    status, text = cli(capsys, "--dataset", "digits", "--device", "cpu", "--epochs", "1",
                       "--model-kwargs", "downsample_factor=64", "--image-size", "8",
                       "--batch-size", "256", "--no-progress", "--out", str(tmp_path / "o"))
    assert status == EXIT_WRITE_FAILED and "Traceback" not in text
    assert "Permission denied" in text


def test_download_offline_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torchvision

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    status, text = cli(capsys, "--dataset", "cifar100", "--download", "--data-dir",
                       str(tmp_path / "data"), "--device", "cpu", "--out", str(tmp_path / "o"))
    assert_one_line_error(status, text, "download failed")
    assert "name resolution" in text
