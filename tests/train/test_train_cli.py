"""The command people type first: ``python -m spacedkd_fast.train`` with no data on disk."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import spacedkd_fast
from spacedkd_fast.train.cli import main

# Subprocesses import the same spacedkd_fast as this test (installed or checkout) and run in a
# temporary folder, so that the current directory can never shadow it.
PACKAGE_PARENT = str(Path(spacedkd_fast.__file__).resolve().parents[1])
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))}


def test_quick_answers_do_not_import_torch(tmp_path):
    """--help, --list-recipes, argument errors and a missing --resume folder answer without
    importing torch."""
    code = ("import sys, contextlib, io\n"
            "from spacedkd_fast.train.cli import main\n"
            "for args in (['--help'], ['--list-recipes'], ['--lr', 'abc'], ['--epochs', '0'],\n"
            "             ['--resume', 'no-such-run']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.redirect_stderr(io.StringIO()):\n"
            "        try:\n"
            "            status = main(args)\n"
            "        except SystemExit as e:\n"
            "            status = e.code\n"
            "    print(args[0], status, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["--help 0 False", "--list-recipes 0 False",
                                        "--lr 2 False", "--epochs 2 False", "--resume 2 False"]


def test_help_reads_like_a_manual(tmp_path):
    done = subprocess.run([sys.executable, "-m", "spacedkd_fast.train", "--help"], env=ENV,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())  # argparse wraps lines anywhere
    for needle in ("--interval-rate", "--amp {auto,off,bf16,fp16}", "--resume OUT", "--list-recipes",
                   "(default: spaced)", "(default: 1.5)", "examples:", "exit status:",
                   "compatibility with the official code"):
        assert needle in text, needle


@pytest.mark.parametrize("flag", ["channels_last", "overlap", "cuda_graphs"])
def test_three_way_switches_take_the_bare_flag_and_its_negation(flag):
    """auto|on|off settings: ``--X`` alone means on, ``--no-X`` off, ``--X auto`` auto."""
    from spacedkd_fast.train.cli import parse

    dashed = "--" + flag.replace("_", "-")
    assert parse([dashed])[1] == {flag: "on"}
    assert parse(["--no-" + dashed[2:]])[1] == {flag: "off"}
    assert parse([dashed, "auto"])[1] == {flag: "auto"}
    assert parse([])[1] == {}


def test_default_command_without_data_trains_on_digits_and_says_so(tmp_path, monkeypatch,
                                                                  capsys):
    # the default architecture (resnet18), narrowed in FLOPs to keep the test short, run from an
    # empty folder (in this process; CI runs the literal command); the digits defaults (3
    # epochs, 8 px, batch 64, lr 0.05) come from the fallback itself
    monkeypatch.chdir(tmp_path)
    status = main(["--model-kwargs", "downsample_factor=64", "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0, out
    lines = out.splitlines()
    assert "CIFAR-100 not found under ./data" in lines[0] and "digits" in lines[0]
    assert lines[1].startswith("digits defaults: epochs 3")
    assert "mode spaced, s=1.5" in out
    # the folder and config.yaml name the data set actually used
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.endswith("-spaced-resnet18-digits")
    assert yaml.safe_load((run / "config.yaml").read_text())["dataset"] == "digits"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    # clearly better than chance (10 classes: 0.1)
    assert rows[-1]["teacher_top1"] > 0.5 and rows[-1]["student_top1"] > 0.5
    assert (run / "curves.png").exists() and (run / "best_student.pt").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None,
                    reason="tensorboard is installed here")
def test_optional_logger_missing_is_a_clear_error(tmp_path, capsys):
    status = main(["--dataset", "digits", "--device", "cpu", "--tensorboard",
                   "--out", str(tmp_path / "o"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert status == 2 and "pip install tensorboard" in err
