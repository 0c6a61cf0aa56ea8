"""``--amp auto`` / ``--channels-last auto``: bf16 + channels_last on CUDA for CNN runs without
``--compat``, fp32 NCHW everywhere else; explicit values kept; what ran recorded in config.yaml.

The table is written from the rule in the issue (not from the code): the resolver is a pure
function of the configuration and the device type, so the CUDA rows need no GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from spacedkd_fast.model_catalog import CATALOG, FAMILIES, is_convolutional
from spacedkd_fast.train.cli import main
from spacedkd_fast.train.config import build_config, from_dict, load_yaml
from spacedkd_fast.train.speed_defaults import (
    apply_speed_defaults,
    channels_last_on,
    resolve_speed,
)

ON_NOTE = "amp bf16 + channels_last (auto: the CUDA default for CNNs; --amp off trains fp32)"


def _cfg(**values):
    return build_config(values, runnable=False)


# (settings, device type, expected amp, expected channels_last)
TABLE = [
    pytest.param({}, "cuda", "bf16", "on", id="cnn-pair-cuda"),
    pytest.param({}, "cuda:1", "bf16", "on", id="cnn-pair-cuda-index"),
    pytest.param({}, "cpu", "off", "off", id="cnn-pair-cpu"),
    pytest.param({"arch": "wrn_40_2", "student_arch": "mobilenetv2"}, "cuda", "bf16", "on",
                 id="other-cnns-cuda"),
    pytest.param({"mode": "base", "arch": "resnet56"}, "cuda", "bf16", "on", id="base-cnn-cuda"),
    pytest.param({"arch": "deit_tiny"}, "cuda", "off", "off", id="vit-pair-cuda"),
    pytest.param({"teacher_arch": "resnet56", "student_arch": "deit_tiny"}, "cuda", "off", "off",
                 id="mixed-pair-cuda"),
    pytest.param({"teacher_arch": "cvt_13", "student_arch": "resnet18"}, "cuda", "off", "off",
                 id="transformer-teacher-cuda"),
    pytest.param({"compat": "official"}, "cuda", "off", "off", id="compat-official-cuda"),
    pytest.param({"mode": "self", "arch": "resnet18"}, "cuda", "bf16", "on", id="self-byot-cuda"),
    pytest.param({"mode": "spaced-self", "arch": "byot_resnet34"}, "cuda", "bf16", "on",
                 id="spaced-self-byot-cuda"),
    pytest.param({"mode": "self", "arch": "resnet18"}, "cpu", "off", "off", id="self-byot-cpu"),
    pytest.param({"amp": "off"}, "cuda", "off", "off", id="explicit-amp-off-cuda"),
    pytest.param({"amp": "fp32"}, "cuda", "off", "off", id="old-spelling-fp32-cuda"),
    pytest.param({"channels_last": "on"}, "cpu", "off", "on", id="explicit-cl-on-cpu"),
    pytest.param({"channels_last": "off"}, "cuda", "bf16", "off", id="explicit-cl-off-cuda"),
    pytest.param({"amp": "fp16"}, "cuda", "fp16", "on", id="explicit-fp16-cnn-cuda"),
    pytest.param({"amp": "bf16"}, "cpu", "bf16", "off", id="explicit-bf16-cpu"),
    pytest.param({"amp": "bf16", "arch": "deit_tiny"}, "cuda", "bf16", "off",
                 id="explicit-bf16-vit-cuda"),
    pytest.param({"amp": "bf16", "compat": "official"}, "cuda", "bf16", "on",
                 id="explicit-bf16-compat-cuda"),
]


@pytest.mark.parametrize(("settings", "device", "amp", "channels_last"), TABLE)
def test_resolution_table(settings, device, amp, channels_last):
    cfg = _cfg(**settings)
    before = cfg.to_dict()
    choice = resolve_speed(cfg, device)
    assert (choice.amp, choice.channels_last) == (amp, channels_last)
    assert cfg.to_dict() == before  # pure: the configuration is untouched


def test_notes_say_what_auto_chose_and_how_to_undo_it():
    assert resolve_speed(_cfg(), "cuda").note == ON_NOTE
    assert resolve_speed(_cfg(), "cpu").note == "amp off"  # the CPU log line as before
    assert resolve_speed(_cfg(amp="off"), "cuda").note == "amp off"
    assert resolve_speed(_cfg(amp="bf16", channels_last="on"), "cpu").note == (
        "amp bf16 + channels_last")
    vit = resolve_speed(_cfg(arch="deit_tiny"), "cuda").note
    assert vit.startswith("amp off (auto: ") and "CNNs only" in vit and "--amp bf16" in vit
    official = resolve_speed(_cfg(compat="official"), "cuda").note
    assert official.startswith("amp off (auto: ") and "--compat official" in official


def test_apply_writes_back_and_a_second_resolution_keeps_it():
    cfg = _cfg()
    choice = apply_speed_defaults(cfg, "cuda")
    assert (cfg.amp, cfg.channels_last) == ("bf16", "on") == (choice.amp, choice.channels_last)
    again = build_config(cfg.to_dict(), runnable=False)  # what config.yaml / a resume holds
    assert (again.amp, again.channels_last) == ("bf16", "on")
    assert (resolve_speed(again, "cpu").amp, resolve_speed(again, "cpu").channels_last) == (
        "bf16", "on")  # explicit now: not replaced, wherever the run continues


def test_every_model_has_a_family_and_the_cnns_are_the_convolutional_ones():
    assert all(info.family in FAMILIES for info in CATALOG.values())
    cnn_prefixes = ("resnet", "byot_resnet", "wrn_", "vgg", "mobilenetv2", "shufflenetv2")
    for name in CATALOG:
        assert is_convolutional(name) == name.startswith(cnn_prefixes), name
    assert is_convolutional("resnet56") and not is_convolutional("no_such_model")


@pytest.mark.parametrize(("saved", "want"), [(False, "off"), (True, "on"), ("off", "off"),
                                             ("yes", "on"), ("AUTO", "auto")])
def test_channels_last_takes_the_old_booleans(saved, want):
    assert from_dict({"channels_last": saved}).channels_last == want


def test_an_old_config_yaml_with_boolean_channels_last_loads(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("amp: 'off'\nchannels_last: false\noverlap: on\n")  # YAML reads on as true
    cfg = build_config(load_yaml(str(path)))
    assert (cfg.amp, cfg.channels_last, cfg.overlap) == ("off", "off", "on")
    path.write_text("amp: none\nchannels_last: true\n")
    cfg = build_config(load_yaml(str(path)))
    assert (cfg.amp, cfg.channels_last) == ("off", "on")


def test_a_wrong_channels_last_value_is_one_clear_error(capsys):
    with pytest.raises(ValueError, match=r"channels_last='sideways' is not one of: auto, on, off"):
        _cfg(channels_last="sideways")
    with pytest.raises(SystemExit) as stop:
        main(["--channels-last", "sideways", "--print-config"])
    assert stop.value.code == 2
    assert "--channels-last: invalid choice: 'sideways'" in capsys.readouterr().err


def test_channels_last_on_refuses_an_unresolved_value():
    assert channels_last_on("on") and channels_last_on(True)
    assert not channels_last_on("off") and not channels_last_on(False)
    with pytest.raises(ValueError, match="not resolved"):
        channels_last_on("auto")


def test_the_resolver_imports_without_torch():
    code = ("import sys, spacedkd_fast.train.speed_defaults as s; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(s.AUTO)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "auto", done.stderr


def test_resume_with_auto_or_equal_flags_continues_what_ran(tmp_path):
    from spacedkd_fast.train.errors import UserError
    from spacedkd_fast.train.runner import resume_plan

    ran = _cfg()
    apply_speed_defaults(ran, "cuda")  # as build_run records a CUDA CNN run
    state = {"config": ran.to_dict(), "epoch": 1, "step_in_epoch": 0, "metrics": []}
    for overrides in ({}, {"amp": "auto", "channels_last": "auto"},
                      {"amp": "bf16", "channels_last": "on"}, {"channels_last": True}):
        cfg, _ = resume_plan(state, tmp_path, dict(overrides))
        assert (cfg.amp, cfg.channels_last) == ("bf16", "on"), overrides
    with pytest.raises(UserError, match=r"--amp \(saved 'bf16', given 'off'\)"):
        resume_plan(state, tmp_path, {"amp": "off"})


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device, amp, layout, header", [
    pytest.param("cpu", "off", "off", "amp off, data backend", id="cpu"),
    pytest.param("cuda", "bf16", "on", ON_NOTE, id="cuda", marks=[pytest.mark.cuda, CUDA]),
])
def test_cli_run_records_what_auto_chose(tmp_path, capsys, device, amp, layout, header):
    """End to end: config.yaml records the resolved amp / channels_last, the header says it, the
    run trained (finite losses), and a resume reads the resolved values back."""
    out = tmp_path / "run"
    status = main(["--dataset", "digits", "--device", device, "--mode", "online", "--epochs", "1",
                   "--model-kwargs", "downsample_factor=64", "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["amp"], saved["channels_last"]) == (amp, layout)
    assert header in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["train_student_loss"]) for r in rows)
    assert main(["--resume", str(out), "--no-progress"]) == 0  # finished: resumes to nothing
    assert "already finished" in capsys.readouterr().out
