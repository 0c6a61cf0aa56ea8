"""Reporting: progress bar on and off a terminal, metrics files, curves, summary table."""

from __future__ import annotations

import csv
import io
import json

from spacedkd_fast.train.curves import panels_of, plot_curves
from spacedkd_fast.train.metric_names import with_aliases
from spacedkd_fast.train.report import (
    MetricsLog,
    ProgressBar,
    read_metrics,
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
    assert list(table[0])[:3] == ["epoch", "test_teacher_top1", "test_student_top1"]
    assert table[0]["exit1_top1"] == "" and float(table[1]["exit1_top1"]) == 0.3
    # a resumed run rewrites both files from the checkpoint's rows
    MetricsLog(tmp_path, rows[:1])
    assert len(read_metrics(tmp_path)) == 1
    # rows of an earlier version are read with the current names
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "student_top1": 0.4,
                                                        "ce": 1.5}) + "\n")
    old = read_metrics(tmp_path)[0]
    assert old["test_student_top1"] == 0.4 and old["train_ce"] == 1.5


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
