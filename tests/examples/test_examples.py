"""Each script of examples/ runs at its tiny size (``--tiny``) in a fresh process, as a user
would start it, and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--tiny"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, f"{name} failed:\n{out.stderr[-3000:]}"
    return out.stdout


def test_own_dataset_spaced_kd():
    text = run_example("own_dataset_spaced_kd.py")
    assert re.search(r"student after spaced KD: top-1 \d+\.\d%, top-5 \d+\.\d%", text)
    steps = int(re.search(r"(\d+) student steps", text).group(1))
    assert steps > 0
    per_sample = float(re.search(r"at most ([\d.]+) bytes per pending sample", text).group(1))
    assert 0 < per_sample <= 16  # keys and checksums, not images


def test_timm_model_with_timm_transform():
    pytest.importorskip("timm")
    text = run_example("timm_model.py")
    assert "student (timm mobilenetv3): top-1" in text
    assert int(re.search(r"(\d+) student steps on replayed batches", text).group(1)) > 0


def test_self_kd():
    text = run_example("self_kd.py")
    assert re.search(r"exit 1 \d+\.\d%, exit 2 \d+\.\d%, exit 3 \d+\.\d%, exit 4 \d+\.\d%, "
                     r"ensemble \d+\.\d%", text)


def test_plain_loader_shows_what_copy_replay_costs():
    text = run_example("plain_loader_copy_replay.py")
    copy = re.search(r"plain DataLoader: CopyReplay, .* \(([\d,.]+) B per sample\)", text)
    keyed = re.search(r"KeyedLoader: KeyedReplay, .* \(([\d,.]+) B per sample\)", text)
    assert copy and keyed, text
    copy_b = float(copy.group(1).replace(",", ""))
    keyed_b = float(keyed.group(1).replace(",", ""))
    image_and_label = 3 * 32 * 32 * 4 + 8  # a float32 32 px RGB image and an int64 label
    assert image_and_label <= copy_b <= image_and_label + 64
    assert 0 < keyed_b <= 16
