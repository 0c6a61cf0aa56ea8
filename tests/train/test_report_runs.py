"""What a tiny real run prints and leaves behind, read the way a new user reads it: the epoch
line and summary of a spaced run before its first replay, the warning for an interval longer than
the run, the words of the self modes, metrics.csv's columns. Runs on the 320-digit subset (L = 5
steps per epoch, ResNet-18 narrowed 64x)."""

from __future__ import annotations

import pytest
from run_helpers import run, tiny_config

from spacedkd_fast.train import runner
from spacedkd_fast.train.metric_names import ALIASES


@pytest.fixture
def curve_titles(monkeypatch):
    """The titles the run gives curves.png (the real plot is still drawn)."""
    titles = []
    real = runner.plot_curves

    def recording(rows, path, *, title=""):
        titles.append(title)
        real(rows, path, title=title)

    monkeypatch.setattr(runner, "plot_curves", recording)
    return titles


def _epoch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("epoch ")]


def test_a_spaced_run_says_when_the_student_is_untrained(tmp_path, digits_bundle):
    # I = int(5 * 1.5) = 7: no replay in epoch 1, the first one at step 7 (epoch 2)
    cfg = tiny_config(tmp_path, mode="spaced", interval_rate=1.5, epochs=2)
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    first, second = _epoch_lines(out)
    assert "student top-1" in first and "(initial weights: not trained yet)" in first
    assert "initial weights" not in second
    # the student loss line gives its parts, the feature term with its weight
    assert "loss teacher" in second and "[CE " in second and ", KD " in second
    assert ", feature 0.03 x " in second
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "note: at epoch 1 the student had taken no training step" in summary
    assert "warning" not in out  # the interval fits in the run
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert not set(header) & (set(ALIASES) | {"phase"})
    assert "test_student_top1_pct" in header and "test_student_top1" not in header


def test_a_self_run_longer_interval_is_warned_and_speaks_of_exits(tmp_path, digits_bundle,
                                                                    curve_titles):
    # I = int(5 * 4) = 20 > 5 steps: the shallow exits learn only in the end-of-run replay
    cfg = tiny_config(tmp_path, mode="spaced-self", interval_rate=4.0, epochs=1)
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    lines = out.splitlines()
    warning = [line for line in lines if line.startswith("warning:")]
    assert warning == [
        "warning: the spacing interval (s=4, first replay after step 20) is longer than this run "
        "(1 epoch of 5 steps = 5 steps): the shallow exits learn only in the end-of-run replay "
        "of all 5 batches. Use a smaller --interval-rate or more --epochs."]
    assert lines.index(warning[0]) < lines.index(_epoch_lines(out)[0])  # said at the start
    summary = (tmp_path / "run" / "summary.txt").read_text()
    for text in (out, summary, *curve_titles):
        assert "teacher" not in text.lower()
        assert "byot_resnet18" in text and " resnet18" not in text.replace("byot_resnet18", "")
    assert curve_titles == ["spaced-self KD, byot_resnet18 on digits"]
