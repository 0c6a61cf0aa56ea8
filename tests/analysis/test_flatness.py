"""``python -m spacedkd_fast.flatness`` end to end on a tiny run folder (digits, CPU)."""

from __future__ import annotations

import json

import torch
from helpers.toys import one_thread  # noqa: F401 (autouse: tiny ops, busy cores)
from runfolders import assert_png, write_run

from spacedkd_fast import compare, flatness
from spacedkd_fast.models import create


def _tiny_run(folder, seed):
    """A run folder as the trainer leaves it: metrics, config.yaml and best_student.pt."""
    config = {"mode": "spaced", "arch": "resnet18", "dataset": "digits", "image_size": 8,
              "augment": "none", "batch_size": 128, "seed": seed,
              "model_kwargs": {"downsample_factor": 64}, "student_kwargs": {}}
    write_run(folder, [{"epoch": 1, "student_top1": 0.2}], config=config)
    torch.manual_seed(seed)
    model = create("resnet18", 10, 8, downsample_factor=64)
    torch.save({"arch": "resnet18", "num_classes": 10, "image_size": 8, "epoch": 1, "top1": 0.2,
                "state_dict": model.state_dict()}, folder / "best_student.pt")
    return folder


def test_flatness_writes_json_and_figure_and_compare_reads_them(tmp_path, capsys):
    runs = [_tiny_run(tmp_path / "g" / f"seed{s}", s) for s in (0, 1)]
    argv = [str(tmp_path / "g"), "--samples", "3", "--points", "3", "--max-batches", "1",
            "--device", "cpu", "--out", str(tmp_path)]
    assert flatness.main(argv) == 0
    captured = capsys.readouterr()
    assert "Hessian trace" in captured.err and "[2/2]" in captured.err  # progress
    assert "group g: Hessian trace" in captured.out
    data = json.loads((runs[0] / "flatness.json").read_text())
    assert data["hessian_samples"] == 3 and len(data["per_probe"]) == 3
    assert data["test_images"] == 128 and data["checkpoint"]["epoch"] == 1
    assert data["profile"]["alpha"] == [-1.0, 0.0, 1.0] and len(data["profile"]["loss"]) == 3
    assert data["hessian_trace"] > 0
    assert_png(tmp_path / "flatness.png")

    # same settings, same checkpoint: kept, not measured again
    assert flatness.main(argv) == 0
    assert "kept" in capsys.readouterr().err

    assert compare.main([str(tmp_path / "g"), "--json", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    traces = summary["groups"][0]["hessian_trace"]
    assert traces["n"] == 2
    assert traces["values"][0] == data["hessian_trace"]
