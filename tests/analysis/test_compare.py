"""``python -m spacedkd_fast.compare`` on generated run folders: values, grouping, figure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from runfolders import assert_png, write_run

from spacedkd_fast import compare
from spacedkd_fast.analysis.runs import Run, canonical_row, collect

EPOCHS = 4


def _rows(rng, *, new_names: bool = False, teacher: bool = True) -> list[dict]:
    rows = []
    for epoch in range(1, EPOCHS + 1):
        row = {"epoch": epoch, "phase": "train",
               "student_top1": float(rng.uniform(0.5, 0.9)), "student_top5": 0.99,
               "teacher_loss": float(rng.uniform(0.1, 1)), "lr": 0.05}
        if teacher:
            row["teacher_top1"] = float(rng.uniform(0.5, 0.9))
        if new_names:  # the renamed fields, with the old names kept as aliases
            row = {("test_" if k.endswith(("_top1", "_top5")) else
                    "train_" if k.endswith("_loss") else "") + k: v for k, v in row.items()}
            row["student_top1"] = -1.0  # a stale alias must not win over the new name
        rows.append(row)
    return rows


@pytest.fixture
def experiment(tmp_path):
    """runs/online/seed{0,1,2} and runs/spaced/seed{0,1,2}, in every file flavour."""
    rng = np.random.default_rng(7)
    rows = {}
    for mode in ("online", "spaced"):
        for seed in range(3):
            fmt = "csv" if (mode, seed) == ("online", 1) else "jsonl"
            new = (mode, seed) == ("spaced", 2)
            r = _rows(rng, new_names=new)
            flat = {"hessian_trace": float(rng.uniform(10, 20)), "hessian_trace_stderr": 0.5}
            write_run(tmp_path / "runs" / mode / f"seed{seed}", r, fmt=fmt, flatness=flat,
                      config={"mode": mode, "seed": seed, "arch": "resnet18",
                              "out": f"runs/{mode}/seed{seed}"})
            rows[(mode, seed)] = ([canonical_row(x) for x in r], flat["hessian_trace"])
    return tmp_path / "runs", rows


def _expected(rows, mode, what):
    values = []
    for seed in range(3):
        r, trace = rows[(mode, seed)]
        if what == "best":
            values.append(100 * max(x["student_top1"] for x in r))
        elif what == "final":
            values.append(100 * r[-1]["student_top1"])
        elif what == "teacher best":
            values.append(100 * max(x["teacher_top1"] for x in r))
        else:
            values.append(trace)
    return np.array(values)


def _run_json(argv, capsys):
    assert compare.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_table_values_match_independent_numbers(experiment, capsys, tmp_path):
    root, rows = experiment
    out = tmp_path / "out"
    summary = _run_json([str(root / "online"), str(root / "spaced"), "--out", str(out)], capsys)
    groups = {g["name"]: g for g in summary["groups"]}
    assert list(groups) == ["online", "spaced"] and summary["baseline"] == "online"
    for mode in ("online", "spaced"):
        models = {m["model"]: m for m in groups[mode]["models"]}
        assert list(models) == ["teacher", "student"]
        for what, model, key in (("best", "student", "best"), ("final", "student", "final"),
                                 ("teacher best", "teacher", "best")):
            want = _expected(rows, mode, what)
            got = models[model][key]
            assert got["n"] == 3
            assert got["mean"] == pytest.approx(want.mean(), rel=1e-12)
            assert got["std"] == pytest.approx(want.std(ddof=1), rel=1e-12)
        trace = _expected(rows, mode, "trace")
        assert groups[mode]["hessian_trace"]["mean"] == pytest.approx(trace.mean())
    diffs = {d["metric"]: d for d in summary["differences"]}
    assert set(diffs) == {"student best top-1 (points)", "student final top-1 (points)",
                          "Hessian trace"}
    best = diffs["student best top-1 (points)"]
    a, b = _expected(rows, "spaced", "best"), _expected(rows, "online", "best")
    assert best["group"] == "spaced" and best["diff"] == pytest.approx(a.mean() - b.mean())
    se = np.sqrt(a.var(ddof=1) / 3 + b.var(ddof=1) / 3)
    assert best["t"] == pytest.approx((a.mean() - b.mean()) / se)
    assert best["low"] < best["diff"] < best["high"]
    # the same numbers in the text table and the files
    text = (out / "compare.txt").read_text()
    std = _expected(rows, "spaced", "best").std(ddof=1)
    assert f"{_expected(rows, 'spaced', 'best').mean():.2f} ± {std:.2f}" in text
    assert f"{best['diff']:+.2f}" in text
    assert json.loads((out / "compare.json").read_text())["groups"] == summary["groups"]
    assert_png(out / "compare.png")


def test_welch_p_value_matches_scipy(experiment, capsys, tmp_path):
    stats = pytest.importorskip("scipy.stats")
    root, rows = experiment
    summary = _run_json([str(root), "--out", str(tmp_path / "o")], capsys)  # a folder of groups
    final = next(d for d in summary["differences"] if d["metric"].endswith("final top-1 (points)"))
    ref = stats.ttest_ind(_expected(rows, "spaced", "final"), _expected(rows, "online", "final"),
                          equal_var=False)
    assert final["p"] == pytest.approx(ref.pvalue, rel=1e-8)


def test_loose_runs_group_by_configuration_and_named_groups(experiment, capsys, tmp_path):
    root, _ = experiment
    loose = sorted(str(p) for p in root.glob("*/seed*"))  # what a shell glob hands over
    summary = _run_json([*loose, "--out", str(tmp_path / "a")], capsys)
    assert [(g["name"], len(g["runs"])) for g in summary["groups"]] == [("online", 3),
                                                                       ("spaced", 3)]
    named = _run_json(["--group", f"A={root / 'spaced'}",
                       "--group", f"B={root / 'online' / 'seed0'},{root / 'online' / 'seed2'}",
                       "--baseline", "B", "--out", str(tmp_path / "b")], capsys)
    assert [(g["name"], len(g["runs"])) for g in named["groups"]] == [("A", 3), ("B", 2)]
    assert {d["group"] for d in named["differences"]} == {"A"}
    assert not (root / "compare.png").exists()  # --out respected


def test_default_output_is_the_inputs_common_folder(experiment, capsys):
    root, _ = experiment
    assert compare.main([str(root / "online"), str(root / "spaced")]) == 0
    out = capsys.readouterr().out
    assert "Difference from online" in out and "Hessian trace" in out
    assert_png(root / "compare.png")
    assert (root / "compare.txt").read_text().strip() in out


def test_self_kd_runs_list_exits_and_the_ensemble(tmp_path):
    rows = [{"epoch": 1, "teacher_top1": 0.5, "student_top1": 0.6, "exit1_top1": 0.3,
             "exit2_top1": 0.4, "exit10_top1": 0.45, "ensemble_top1": 0.6}]
    run = Run.read(write_run(tmp_path / "self", rows))
    assert run.models() == [("exit 1", "exit1"), ("exit 2", "exit2"), ("exit 10", "exit10"),
                            ("ensemble", "student")]
    (group,) = collect([str(tmp_path / "self")])
    assert group.name == "self"


def test_canonical_row_reads_old_and_new_names():
    assert canonical_row({"epoch": 1, "student_top1": 0.5}) == {"epoch": 1, "student_top1": 0.5}
    row = canonical_row({"test_student_top1": 0.7, "student_top1": 0.1, "train_ce": 2.0,
                         "test_exit3_top5": 0.9, "lr": 0.1})
    assert row == {"student_top1": 0.7, "ce": 2.0, "exit3_top5": 0.9, "lr": 0.1}


def test_canonical_row_covers_the_trainers_renames():
    """Every (old, new) pair of the trainer's metric names reads back under the old name."""
    names = pytest.importorskip("spacedkd_fast.train.metric_names")
    for old, new in names.ALIASES.items():
        assert canonical_row({new: 0.25, "epoch": 1}) == {old: 0.25, "epoch": 1}, (old, new)
        assert canonical_row(names.with_aliases({new: 0.5}))[old] == 0.5
