"""Each script of examples/ runs at its tiny size (``--tiny``) in a fresh process, as a user
would start it, and prints what it promises. The four processes start together (most of each
one's time is importing torch), and each test waits for its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


SCRIPTS = ("own_dataset_spaced_kd.py", "timm_model.py", "self_kd.py",
           "plain_loader_copy_replay.py")


@pytest.fixture(scope="module")
def started():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen([sys.executable, str(EXAMPLES / name), "--tiny"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env)
             for name in SCRIPTS}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.fixture
def run_example(started):
    def wait(name: str) -> str:
        try:
            out, err = started[name].communicate(timeout=300)
        except subprocess.TimeoutExpired:
            started[name].kill()
            raise AssertionError(f"{name} ran past 300 s") from None
        assert started[name].returncode == 0, f"{name} failed:\n{err[-3000:]}"
        return out
    return wait


def test_own_dataset_spaced_kd(run_example):
    text = run_example("own_dataset_spaced_kd.py")
    assert re.search(r"student after spaced KD: top-1 \d+\.\d%, top-5 \d+\.\d%", text)
    steps = int(re.search(r"(\d+) student steps", text).group(1))
    assert steps > 0
    per_sample = float(re.search(r"at most ([\d.]+) bytes per pending sample", text).group(1))
    assert 0 < per_sample <= 16  # keys and checksums, not images


def test_timm_model_with_timm_transform(run_example):
    pytest.importorskip("timm")
    text = run_example("timm_model.py")
    assert "student (timm mobilenetv3): top-1" in text
    assert int(re.search(r"(\d+) student steps on replayed batches", text).group(1)) > 0


def test_self_kd(run_example):
    text = run_example("self_kd.py")
    assert re.search(r"exit 1 \d+\.\d%, exit 2 \d+\.\d%, exit 3 \d+\.\d%, exit 4 \d+\.\d%, "
                     r"ensemble \d+\.\d%", text)


def test_plain_loader_shows_what_copy_replay_costs(run_example):
    text = run_example("plain_loader_copy_replay.py")
    copy = re.search(r"plain DataLoader: CopyReplay, .* \(([\d,.]+) B per sample\)", text)
    keyed = re.search(r"KeyedLoader: KeyedReplay, .* \(([\d,.]+) B per sample\)", text)
    assert copy and keyed, text
    copy_b = float(copy.group(1).replace(",", ""))
    keyed_b = float(keyed.group(1).replace(",", ""))
    image_and_label = 3 * 32 * 32 * 4 + 8  # a float32 32 px RGB image and an int64 label
    assert image_and_label <= copy_b <= image_and_label + 64
    assert 0 < keyed_b <= 16
