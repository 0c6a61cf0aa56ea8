"""Reporting: progress bar on and off a terminal, metrics files, curves, summary table."""

from __future__ import annotations

import csv
import io
import json

import pytest

from spacedkd_fast.train.curves import (
    UNTRAINED_LABEL,
    UNTRAINED_LABEL_SELF,
    draw_curves,
    panels_of,
    plot_curves,
)
from spacedkd_fast.train.metric_names import ALIASES, with_aliases
from spacedkd_fast.train.report import (
    MetricsLog,
    ProgressBar,
    loss_labels,
    read_metrics,
    row_text,
    summary_table,
)


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(10, "epoch 1/2", stream=stream)
    bar.update(1, 64)  # no fresh loss values: nothing printed in a log
    assert stream.getvalue() == ""
    bar.update(5, 320, stats={"teacher_loss": 1.25, "student_loss": 2.5}, lr=0.01)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in stream.getvalue() and "\033" not in stream.getvalue()
    assert "epoch 1/2" in lines[0] and " 5/10" in lines[0]
    assert "teacher_loss 1.2500" in lines[0] and "lr 0.01" in lines[0]
    assert "img/s" in lines[0] and "eta" in lines[0]


def test_progress_bar_of_a_self_run_names_its_losses():
    stream = io.StringIO()
    bar = ProgressBar(2, "epoch 1/1", stream=stream,
                      labels=loss_labels(_cfg(mode="spaced-self", is_self=True)))
    bar.update(1, 64, stats={"teacher_loss": 1.25, "student_loss": 40.0, "feat": 700.0})
    line = stream.getvalue()
    assert "deepest-exit CE 1.2500" in line and "self-KD 40.0000" in line
    assert "feature 700.0000" in line and "teacher" not in line


def test_progress_bar_redraws_in_place_on_a_terminal():
    stream = FakeTTY()
    bar = ProgressBar(4, "epoch 1/1", stream=stream)
    for i in range(1, 5):
        bar.update(i, 10 * i, stats={"teacher_loss": 0.5})
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r\033[K") and text.endswith("\n")
    assert "[" + "#" * 24 + "]" in text  # the final state is a full bar


def test_disabled_bar_is_silent():
    stream = FakeTTY()
    bar = ProgressBar(4, "x", stream=stream, enabled=False)
    bar.update(4, 10, stats={"a": 1.0})
    bar.close()
    assert stream.getvalue() == ""


def test_metrics_files_and_nan_as_null(tmp_path):
    log = MetricsLog(tmp_path)
    log.append({"epoch": 1, "test_teacher_top1": 0.5, "test_student_top1": 0.25, "lr": 0.1,
                "x": float("nan")})
    log.append({"epoch": 2, "test_teacher_top1": 0.75, "test_student_top1": 0.5, "lr": 0.1,
                "exit1_top1": 0.3})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["x"] is None and rows[1]["exit1_top1"] == 0.3
    with open(tmp_path / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["epoch"] for r in table] == ["1", "2"]
    # accuracies in percent, as the console prints them; old names stay out of the CSV
    assert list(table[0])[:3] == ["epoch", "test_teacher_top1_pct", "test_student_top1_pct"]
    assert float(table[1]["test_teacher_top1_pct"]) == 75.0 and table[0]["x"] == ""
    assert "exit1_top1" not in table[0]
    # a resumed run rewrites both files from the checkpoint's rows
    MetricsLog(tmp_path, rows[:1])
    assert len(read_metrics(tmp_path)) == 1
    # rows of an earlier version are read with the current names
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "student_top1": 0.4,
                                                        "ce": 1.5}) + "\n")
    old = read_metrics(tmp_path)[0]
    assert old["test_student_top1"] == 0.4 and old["train_ce"] == 1.5


def _trainer_row(epoch: int, **extra) -> dict:
    """A row as loop.epoch_row builds it: current names, the old ones as aliases, ``phase``."""
    return with_aliases({"epoch": epoch, "trained": "teacher+student", "phase": "train",
                         "test_teacher_top1": 0.6 + 0.01 * epoch, "test_teacher_top5": 0.9,
                         "test_student_top1": 1 / 3, "test_student_top5": 0.8,
                         "train_teacher_loss": 1.0 / epoch, "train_student_loss": 6.89,
                         "train_ce": 1.2, "train_kl": 0.4, "train_feat": 167.0, "lr": 0.01,
                         "student_steps": 5 * epoch, **extra})


def test_the_csv_has_no_old_names_and_analysis_reads_it_as_the_jsonl(tmp_path):
    from spacedkd_fast.analysis.runs import read_rows

    rows = [_trainer_row(1), _trainer_row(2)]
    (tmp_path / "run").mkdir()
    MetricsLog(tmp_path / "run", rows)
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    # no column holds an old name, every accuracy column is in percent
    assert not set(header) & (set(ALIASES) | {"phase"})
    assert [c for c in header if "top" in c] == [
        "test_teacher_top1_pct", "test_teacher_top5_pct", "test_student_top1_pct",
        "test_student_top5_pct"]
    from_jsonl = read_rows(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    from_csv = read_rows(tmp_path / "run")
    for a, b in zip(from_csv, from_jsonl):
        assert a["student_top1"] == pytest.approx(1 / 3, abs=1e-6)  # 4 decimals of a percent
        assert a.keys() <= b.keys()
        for key, value in a.items():
            assert value == pytest.approx(b[key], abs=1e-6), key


def test_a_self_kd_csv_names_its_exits_not_a_teacher(tmp_path):
    row = _trainer_row(1, test_exit1_top1=0.2, test_exit2_top1=0.5, test_ensemble_top1=1 / 3)
    MetricsLog(tmp_path, [row])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "test_exit1_top1_pct" in header and "test_ensemble_top1_pct" in header
    assert not [c for c in header if "teacher_top" in c]  # the deepest exit's own column has it


def test_rows_carry_the_earlier_names_as_aliases():
    row = with_aliases({"epoch": 3, "test_student_top1": 0.5, "test_exit2_top5": 0.9,
                        "train_student_loss": 2.0, "train_feat": 4.0})
    assert (row["student_top1"], row["exit2_top5"], row["student_loss"], row["feat"]) == \
        (0.5, 0.9, 2.0, 4.0)
    assert "teacher_top1" not in row  # only fields the row has


def test_curves_png(tmp_path):
    rows = [{"epoch": e, "test_teacher_top1": 0.1 * e, "test_student_top1": 0.05 * e,
             "train_teacher_loss": 2.0 / e, "train_student_loss": 5.0, "train_ce": 1.0 / e,
             "train_kl": 0.1, "train_feat": 40.0} for e in range(1, 4)]
    plot_curves(rows, tmp_path / "curves.png", title="t")
    data = (tmp_path / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # one panel each: accuracy, the teacher's CE, the student's CE and KD parts, its feature term;
    # the student's total (mostly the feature term) is not drawn beside the teacher's CE
    panels = panels_of(rows)
    assert [[key for _, key, _ in lines] for _, lines in panels] == [
        ["test_teacher_top1", "test_student_top1"], ["train_teacher_loss"],
        ["train_ce", "train_kl"], ["train_feat"]]
    assert panels[0][1][0][2] == 100.0  # accuracy in percent
    # a base run (no teacher, no parts): accuracy and the student's loss
    base = [{"epoch": 1, "test_student_top1": 0.3, "train_student_loss": 2.0}]
    assert [[k for _, k, _ in lines] for _, lines in panels_of(base)] == [
        ["test_student_top1"], ["train_student_loss"]]


def test_summary_table_best_final_gain():
    rows = [{"epoch": 1, "teacher_top1": 0.5, "teacher_top5": 0.9, "student_top1": 0.4,
             "student_top5": 0.8},
            {"epoch": 2, "teacher_top1": 0.6, "teacher_top5": 0.95, "student_top1": 0.38,
             "student_top5": 0.85}]
    # the comparison run's best (0.36, epoch 1) is not its last epoch: the gain is best vs best
    online = [{"epoch": 1, "student_top1": 0.36}, {"epoch": 2, "student_top1": 0.35}]
    text = summary_table(rows, wall_s=75.0, images_per_s=123.4,
                         models=[("teacher", "teacher"), ("student", "student")],
                         compare=online, compare_name="online", heading=["HEAD LINE"])
    assert text.splitlines()[0] == "HEAD LINE"
    table = {line.split()[0]: line.split()[1:] for line in text.splitlines()
             if line.startswith(("teacher ", "student ")) and "%" in line.split()[1]}
    # columns: best top-1, its epoch, final top-1, final top-5
    assert table["teacher"] == ["60.00%", "2", "60.00%", "95.00%"]
    assert table["student"] == ["40.00%", "1", "38.00%", "85.00%"]
    assert "online: 36.00% -> 40.00% (gain +4.00 points)" in text
    assert "01:15" in text and "(75.0 s)" in text and "123.4 training images/s" in text
    worse = summary_table(rows, wall_s=3725.0, images_per_s=1.0, models=[("student", "student")],
                          compare=[{"epoch": 1, "student_top1": 0.455}], compare_name="x")
    assert "gain -5.50 points" in worse and "1:02:05" in worse


def _visible_ticks(ax) -> list[str]:
    lo, hi = ax.get_xlim()
    return [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]


def test_epoch_ticks_are_integers_even_for_one_epoch():
    import matplotlib.pyplot as plt

    for epochs in ([1], [2], [1, 2, 3]):
        rows = [_trainer_row(e) for e in epochs]
        fig = draw_curves(rows)
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = _visible_ticks(ax)
            assert ticks and all(t.lstrip("\N{MINUS SIGN}-").isdigit() for t in ticks), (epochs, ticks)
        if len(epochs) == 1:
            assert _visible_ticks(fig.axes[0]) == [str(epochs[0])]
        plt.close(fig)


def _cfg(**kw):
    from types import SimpleNamespace

    values = dict(epochs=2, mode="spaced", is_self=False, beta=0.03, interval_rate=1.5)
    return SimpleNamespace(**{**values, **kw})


def test_epochs_before_the_first_replay_are_said_and_shaded():
    import matplotlib.pyplot as plt

    rows = [_trainer_row(1, student_steps=0, epoch_s=1.0), _trainer_row(2, epoch_s=1.0)]
    assert "(initial weights: not trained yet)" in row_text(rows[0], _cfg(), has_teacher=True)
    assert "initial weights" not in row_text(rows[1], _cfg(), has_teacher=True)
    text = summary_table(rows, wall_s=1.0, images_per_s=1.0,
                         models=[("teacher", "teacher"), ("student", "student")])
    assert ("note: at epoch 1 the student had taken no training step (its first replay came "
            "later), so its accuracy there is that of its initial weights") in text
    fig = draw_curves(rows)
    spans = [p for p in fig.axes[0].patches if p.get_label() == UNTRAINED_LABEL]
    assert len(spans) == 1
    span = spans[0]  # a Rectangle in data x, axes y
    assert (span.get_x(), span.get_x() + span.get_width()) == (0.5, 1.5)  # epoch 1 only
    assert not any(p.get_label() == UNTRAINED_LABEL for ax in fig.axes[1:] for p in ax.patches)
    plt.close(fig)
    fig = draw_curves(rows[1:])  # trained throughout: nothing shaded
    assert not fig.axes[0].patches
    plt.close(fig)


def test_the_student_loss_line_shows_its_parts():
    line = row_text(_trainer_row(2, epoch_s=1.0), _cfg(), has_teacher=True)
    assert "loss teacher 0.5000 student 6.8900 [CE 1.2000, KD 0.4000, feature 0.03 x 167.00]" in line


def test_self_kd_curves_and_lines_name_exits():
    import matplotlib.pyplot as plt

    rows = [{"epoch": 1, "test_teacher_top1": 0.5, "test_student_top1": 0.55, "test_exit1_top1": 0.1,
             "test_exit2_top1": 0.5, "test_ensemble_top1": 0.55, "train_teacher_loss": 1.5,
             "train_student_loss": 40.0, "train_ce": 0.1, "train_kl": 0.8, "train_feat": 700.0,
             "student_steps": 0, "lr": 0.05, "epoch_s": 1.0, "test_student_top5": 0.9}]
    labels = [label for _, lines in panels_of(rows) for label, _, _ in lines]
    titles = [title for title, _ in panels_of(rows)]
    assert labels[:3] == ["exit 1", "exit 2", "ensemble"]
    assert not [w for w in labels + titles if "teacher" in w or "student" in w]
    line = row_text(rows[0], _cfg(mode="spaced-self", is_self=True), has_teacher=False)
    assert "teacher" not in line and "deepest-exit CE 1.5000 self-KD 40.0000" in line
    assert "(shallow exits: initial weights, no replay yet)" in line
    fig = draw_curves(rows)
    assert [p.get_label() for p in fig.axes[0].patches] == [UNTRAINED_LABEL_SELF]
    plt.close(fig)
