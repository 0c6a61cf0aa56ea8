"""Bad input to the evidence CLIs: exit status 2 and one line on stderr, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from runfolders import write_run

import spacedkd_fast
from spacedkd_fast import compare, flatness

GOOD_ROWS = [{"epoch": 1, "student_top1": 0.5}]


def _main_status(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


def _bad_inputs(tmp: Path) -> dict[str, list[str]]:
    (tmp / "empty").mkdir()
    (tmp / "not_a_folder.txt").write_text("x")
    bad_json = tmp / "bad_json"
    bad_json.mkdir()
    (bad_json / "metrics.jsonl").write_text('{"epoch": 1, "student_top1": 0.5}\n{"epoch": 2,\n')
    no_rows = tmp / "no_rows"
    no_rows.mkdir()
    (no_rows / "metrics.jsonl").write_text("\n")
    no_epoch = write_run(tmp / "no_epoch", [{"student_top1": 0.5}])
    not_text = tmp / "not_text"
    not_text.mkdir()
    (not_text / "metrics.jsonl").write_bytes(b"\xff\xfe\x00binary")
    good = write_run(tmp / "good", GOOD_ROWS)
    return {
        "nothing given": [],
        "missing folder": [str(tmp / "nope")],
        "a file": [str(tmp / "not_a_folder.txt")],
        "no runs": [str(tmp / "empty")],
        "bad json": [str(bad_json)],
        "no rows": [str(no_rows)],
        "no epoch": [str(no_epoch)],
        "not text": [str(not_text)],
        "bad group": ["--group", "nameonly"],
        "unknown flag": [str(good), "--frobnicate"],
    }


@pytest.mark.parametrize("case", ["nothing given", "missing folder", "a file", "no runs",
                                  "bad json", "no rows", "no epoch", "not text", "bad group",
                                  "unknown flag"])
def test_compare_bad_input(case, tmp_path, capsys):
    argv = _bad_inputs(tmp_path)[case]
    assert _main_status(compare.main, [*argv, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in captured.err, lines


def test_compare_unknown_baseline(tmp_path, capsys):
    good = write_run(tmp_path / "good", GOOD_ROWS)
    assert compare.main([str(good), "--baseline", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_flatness_without_best_student(tmp_path, capsys):
    good = write_run(tmp_path / "good", GOOD_ROWS)
    assert flatness.main([str(good), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "best_student.pt" in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("tool", ["compare", "flatness"])
def test_exit_status_of_the_real_process(tool, tmp_path):
    env = dict(os.environ)
    root = str(Path(spacedkd_fast.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", f"spacedkd_fast.{tool}", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"python -m spacedkd_fast.{tool}: error: {tmp_path / 'nope'}: no such folder"]
