"""End-to-end training runs (in-process, tiny models, digits at 8 px): every mode, outputs,
replay fidelity, evaluation against an independent count, a NaN injected into a batch, bad input."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch
import yaml
from run_helpers import L, run, tiny_config

from spacedkd_fast.engine.trace import read_trace
from spacedkd_fast.train import runner
from spacedkd_fast.train.checkpoint import BEST_NAME, CHECKPOINT_NAME, load_checkpoint
from spacedkd_fast.train.cli import main
from spacedkd_fast.train.metric_names import ALIASES

REQUIRED = ("epoch", "trained", "test_teacher_top1", "test_student_top1", "test_teacher_top5",
            "test_student_top5", "train_teacher_loss", "train_student_loss", "lr", "images_per_s",
            "wall_s")


def naive_top1(model: torch.nn.Module, batches) -> float:
    """Independent accuracy: plain loop, argmax per row, counted in Python."""
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in batches:
            _, logits = model(x)
            if isinstance(logits, (list, tuple)):
                logits = torch.stack(list(logits)).mean(0)
            for row, target in zip(logits.tolist(), y.tolist()):
                right += int(max(range(len(row)), key=row.__getitem__) == target)
                total += 1
    return right / total


MODES = [("base", 1), ("online", 1), ("spaced", 2), ("offline", 1), ("self", 1), ("spaced-self", 2)]


@pytest.mark.parametrize("mode, epochs", MODES)
def test_every_mode_trains_end_to_end_and_writes_well_formed_outputs(tmp_path, mode, epochs,
                                                                     digits_bundle):
    cfg = tiny_config(tmp_path, mode=mode, epochs=epochs, trace=str(tmp_path / "trace.jsonl"),
                      interval_rate={"spaced": 1.5, "spaced-self": 1.5}.get(mode, 1.5))
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    folder = tmp_path / "run"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == (2 * epochs if mode == "offline" else epochs)
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    for r in rows:
        for key in REQUIRED:
            assert key in r, (mode, key)
        for old, new in ALIASES.items():  # the earlier names stay, as aliases, for one version
            assert (old in r) == (new in r) and r.get(old) == r.get(new), (old, new)
        for key in ("student_top1", "student_top5"):
            assert 0.0 <= r[key] <= 1.0
        assert r["student_top5"] >= r["student_top1"]
    last = rows[-1]
    assert {r["trained"] for r in rows} == {
        "base": {"model"}, "online": {"teacher+student"}, "spaced": {"teacher", "teacher+student"},
        "offline": {"teacher", "student"}, "self": {"network"}, "spaced-self": {"network"}}[mode]
    if mode in ("self", "spaced-self"):
        for i in range(1, 5):
            assert 0.0 <= last[f"exit{i}_top1"] <= 1.0
        assert last["student_top1"] == last["ensemble_top1"]
        assert last["teacher_top1"] == last["exit4_top1"]  # the deepest exit teaches
    elif mode == "base":
        assert last["teacher_top1"] is None
    else:
        assert 0.0 <= last["teacher_top1"] <= 1.0
    # every batch was learned from once by each model (the tail of spaced modes flushed)
    total = epochs * L
    if mode in ("online", "spaced", "offline"):
        assert (last["teacher_steps"], last["student_steps"]) == (total, total)
    if mode == "spaced-self":
        assert (last["teacher_steps"], last["student_steps"]) == (total, total)
    # files people read
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(folder / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [r["epoch"] for r in rows]
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["mode"] == cfg.mode and saved["epochs"] == epochs
    summary = (folder / "summary.txt").read_text().splitlines()
    assert any("best top-1" in line for line in summary)
    # the heading names mode, data set, architectures, interval and wall time
    assert summary[0].startswith(f"{cfg.mode} KD") and " on digits: " in summary[0]
    assert "resnet18" in summary[0] and "wall time" in summary[1]
    if mode in ("spaced", "spaced-self"):
        assert f"s={cfg.interval_rate:g} (replay every {int(L * cfg.interval_rate)} steps)" \
            in summary[0]
    assert load_checkpoint(folder)["finished"] is True
    # the trace: each student step trained on exactly the batch its teacher step recorded
    events = read_trace(tmp_path / "trace.jsonl")
    teacher = {e["key"]: e["checksum"] for e in events if e["event"] == "teacher_step"}
    student = [e for e in events if e["event"] == "student_step"]
    if mode in ("spaced", "spaced-self"):
        assert [e["key"] for e in student] == sorted(teacher) == list(range(1, total + 1))
        assert all(e["checksum"] == teacher[e["key"]] for e in student)


@pytest.mark.parametrize("mode", ["spaced", "spaced-self"])
def test_reported_accuracy_matches_an_independent_count(tmp_path, mode, digits_bundle):
    from spacedkd_fast.models import create

    cfg = tiny_config(tmp_path, mode=mode, epochs=1, interval_rate=0.4)
    assert run(cfg, data=digits_bundle)[0] == 0
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    best = torch.load(tmp_path / "run" / BEST_NAME, weights_only=True)
    model = create(best["arch"], best["num_classes"], best["image_size"], downsample_factor=64)
    model.load_state_dict(best["state_dict"])
    assert naive_top1(model, digits_bundle.test()) == pytest.approx(rows[-1]["student_top1"],
                                                                     abs=1e-12)
    assert best["top1"] == max(r["student_top1"] for r in rows)


class PoisonedSource:
    """The digits source with NaN pixels in one keyed batch."""

    def __init__(self, inner, bad_key: int) -> None:
        self.inner, self.bad_key = inner, bad_key
        self.steps_per_epoch, self.num_samples = inner.steps_per_epoch, inner.num_samples

    def _poison(self, key, batch):
        x, y = batch
        if key == self.bad_key:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return x, y

    def epoch(self, e, start=0):
        for key, batch in self.inner.epoch(e, start=start):
            yield key, self._poison(key, batch)

    def batch(self, key):
        return self._poison(key, self.inner.batch(key))


def test_a_nan_in_a_batch_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(
        tmp_path, digits_bundle):
    bad = L + 3  # epoch 2, batch 3
    data = dataclasses.replace(digits_bundle, train=PoisonedSource(digits_bundle.train, bad))
    cfg = tiny_config(tmp_path, mode="online", epochs=2)
    status, out = run(cfg, data=data)
    assert status == runner.EXIT_NONFINITE
    assert f"step n={bad}: epoch 2, batch 3 of {L}" in out and "non-finite teacher loss" in out
    assert "last good checkpoint (after epoch 1)" in out
    assert "Lower --lr, or check the data" in out  # no "--amp off" advice to an fp32 run
    state = load_checkpoint(tmp_path / "run")
    assert state["epoch"] == 1 and not state["finished"]
    weights = state["models"]["teacher"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 1


def test_amp_bf16_channels_last_and_paper_code_objective_run(tmp_path, digits_bundle):
    cfg = tiny_config(tmp_path, mode="online", epochs=1, amp="bf16", channels_last="on",
                      kd_loss="paper-code", beta=0.0)
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    row = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert row["student_loss"] is not None and row["student_loss"] == row["student_loss"]


def test_amp_bf16_with_the_feature_loss(tmp_path, digits_bundle, monkeypatch):
    """Under --amp bf16 the student's layers compute in bfloat16, the projection head trains, and
    the logged loss is the KD objective plus beta times the logged feature term."""
    seen: dict[str, set] = {"student": set()}
    built = {}

    def build_and_watch(cfg, info, **kw):
        parts = runner_build(cfg, info, **kw)
        last_linear = [m for m in parts.student.modules() if isinstance(m, torch.nn.Linear)][-1]
        last_linear.register_forward_hook(
            lambda m, i, out: seen["student"].add(out.dtype) if m.training else None)
        built["parts"] = parts
        return parts

    runner_build = runner.build_run
    monkeypatch.setattr(runner, "build_run", build_and_watch)
    cfg = tiny_config(tmp_path, mode="online", epochs=1, amp="bf16", beta=0.03)
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    assert seen["student"] == {torch.bfloat16}
    row = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])
    assert row["feat"] > 0 and row["ce"] > 0 and row["kl"] >= 0
    # per step: loss = (1 - alpha) * ce + alpha * kd_scale * kl + beta * feat; epoch means keep it
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    scale = saved["temperature"] ** 2 if saved["kd_scale"] is None else saved["kd_scale"]
    a = saved["alpha"]
    expected = (1 - a) * row["ce"] + a * scale * row["kl"] + 0.03 * row["feat"]
    assert row["student_loss"] == pytest.approx(expected, rel=1e-2)
    # the projection head was trained and saved with the run, in float32
    head = load_checkpoint(tmp_path / "run")["engine"][0]["projector"]
    assert head is not None and all(t.dtype == torch.float32 for t in head.values())
    live = built["parts"].distiller.projector
    assert all(torch.equal(v, head[k]) for k, v in live.state_dict().items())


def test_an_existing_run_is_never_overwritten(tmp_path, digits_bundle):
    cfg = tiny_config(tmp_path, mode="base", epochs=1)
    assert run(cfg, data=digits_bundle)[0] == 0
    with pytest.raises(runner.UserError, match="already holds a run.*--resume"):
        run(tiny_config(tmp_path, mode="base", epochs=1), data=digits_bundle)


# ---------------------------------------------------------------------------- bad input (CLI)
def cli(capsys, *args) -> tuple[int, str]:
    status = main(list(args))
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def test_unknown_arch_lists_the_choices(tmp_path, capsys):
    status, text = cli(capsys, "--arch", "resnet7", "--dataset", "digits", "--device", "cpu",
                       "--out", str(tmp_path / "o"))
    assert status == 2 and "unknown model 'resnet7'" in text and "resnet18" in text


def test_unknown_dataset_lists_the_choices(tmp_path, capsys):
    status, text = cli(capsys, "--dataset", "mnist", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert status == 2 and "mnist" in text and "cifar100" in text and "digits" in text


def test_named_dataset_missing_is_an_error_not_a_fallback(tmp_path, capsys):
    status, text = cli(capsys, "--dataset", "cifar100", "--data-dir", str(tmp_path / "none"),
                       "--device", "cpu", "--out", str(tmp_path / "o"))
    assert status == 2 and "cifar-100-python" in text
    assert "embedded digits" not in text  # no silent fallback
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "epochs must be greater than zero"),
    ("--batch-size", "-8", "batch_size must be greater than zero"),
    ("--lr", "0", "lr must be greater than zero"),
    ("--temperature", "-2", "temperature must be greater than zero"),
])
def test_non_positive_numbers_are_rejected(capsys, flag, value, message):
    status, text = cli(capsys, flag, value)
    assert status == 2 and message in text


def test_unwritable_out_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status, text = cli(capsys, "--dataset", "digits", "--device", "cpu", "--out",
                       str(blocker / "sub"))
    assert status == 2 and "cannot write there" in text


def test_resume_of_missing_or_corrupt_checkpoint(tmp_path, capsys):
    status, text = cli(capsys, "--resume", str(tmp_path))
    assert status == 2 and "no checkpoint in" in text
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"\x00garbage" * 100)
    status, text = cli(capsys, "--resume", str(tmp_path))
    assert status == 2 and "not a checkpoint of this package" in text




def test_summary_reports_the_gain_over_a_comparison_run(tmp_path, digits_bundle):
    online = tiny_config(tmp_path, mode="online", epochs=1, out=str(tmp_path / "online"))
    assert run(online, data=digits_bundle)[0] == 0
    spaced = tiny_config(tmp_path, mode="spaced", epochs=1, interval_rate=0.4,
                         compare=str(tmp_path / "online"), out=str(tmp_path / "spaced"))
    status, out = run(spaced, data=digits_bundle)
    assert status == 0
    theirs = json.loads((tmp_path / "online/metrics.jsonl").read_text())["student_top1"]
    ours = json.loads((tmp_path / "spaced/metrics.jsonl").read_text())["student_top1"]
    line = next(x for x in out.splitlines() if "vs online" in x)
    assert f"gain {100 * (ours - theirs):+.2f} points" in line
    assert line in (tmp_path / "spaced/summary.txt").read_text()


def test_a_student_that_never_trains_is_said_and_each_epoch_names_what_trained(tmp_path,
                                                                               digits_bundle):
    # the ViT loop's student catches up only when its counter reaches L*s: never within 1 epoch
    cfg = tiny_config(tmp_path, mode="spaced", epochs=1, interval_rate=1.5, replay="fresh")
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    assert "the student took no training step" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["trained"] for r in rows] == ["teacher"]
