"""--cuda-graphs on: what the configuration refuses (one line per setting, naming the flag to
change), the run-time refusal without CUDA (exit 2, one line, nothing written), and the optimisers
and schedules it builds (a tensor rate on the parameters' device, written in place)."""

from __future__ import annotations

import math

import pytest
import torch

from spacedkd_fast.train.cli import main
from spacedkd_fast.train.config import build_config
from spacedkd_fast.train.config_checks import graph_errors
from spacedkd_fast.train.errors import EXIT_BAD_INPUT
from spacedkd_fast.train.lr_schedule import EpochSchedule, StepSchedule
from spacedkd_fast.train.optim import build_optimizer

GOOD = dict(mode="spaced", cuda_graphs="on", finite_check_every=8, amp="bf16", device="auto")


def test_on_without_cuda_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["--mode", "spaced", "--cuda-graphs", "on", "--finite-check-every", "4",
                   "--device", "cpu", "--dataset", "digits", "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == EXIT_BAD_INPUT == 2
    # --device cpu is named before anything else, without loading torch; on a machine without
    # CUDA, --device auto is refused at run time in the same words
    assert err.splitlines()[-1].strip() == ("- --cuda-graphs on needs a CUDA device (this run is "
                                            "on --device cpu): use --cuda-graphs off")
    assert len(err.splitlines()) == 2  # "invalid configuration:" and the one reason
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the run-time refusal needs a machine "
                    "without CUDA")
def test_on_with_device_auto_on_a_machine_without_cuda_is_refused_at_run_time(tmp_path, capsys):
    out = tmp_path / "run"
    status = main(["--mode", "spaced", "--cuda-graphs", "on", "--finite-check-every", "4",
                   "--dataset", "digits", "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == EXIT_BAD_INPUT
    assert err == ("error: --cuda-graphs on needs a CUDA device (this run is on cpu); use "
                   "--cuda-graphs off")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_overlap_on_without_cuda_is_one_line(tmp_path, capsys):
    status = main(["--mode", "spaced", "--overlap", "--dataset", "digits", "--epochs", "1",
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == EXIT_BAD_INPUT
    assert err == ("error: --overlap on needs a CUDA device (this run is on cpu); use --overlap "
                   "auto or off")


def test_a_good_graph_configuration_has_no_errors_and_auto_off_are_never_checked():
    assert graph_errors(build_config(dict(GOOD))) == []
    for value in ("auto", "off"):  # auto is off until capture is verified on a GPU
        cfg = build_config(dict(GOOD, cuda_graphs=value, finite_check_every=1, mode="self",
                                arch="resnet18"))
        assert graph_errors(cfg) == []


@pytest.mark.parametrize("change,flag", [
    (dict(finite_check_every=1), "--finite-check-every"),
    (dict(trace="t.jsonl"), "--trace"),
    (dict(amp="fp16", device="cuda"), "--amp"),
    (dict(mode="self", arch="resnet18"), "supports modes"),
    (dict(compat="official-vit"), "--replay fresh or a shared optimiser"),
])
def test_each_setting_a_capture_cannot_run_with_is_named(change, flag, capsys):
    values = dict(GOOD) | change
    argv = []
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    assert main([*argv, "--print-config"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "--cuda-graphs on" in line]
    assert len(lines) == 1 and flag in lines[0] and "--cuda-graphs off" in lines[0]


class Cfg:
    lr, momentum, weight_decay, weight_decay_groups = 0.1, 0.9, 5e-4, "official"

    def __init__(self, optimizer):
        self.optimizer = optimizer


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_graph_optimisers_have_a_tensor_rate_that_the_schedules_write_in_place(name):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = build_optimizer(Cfg(name), model, graphs=True)
    rate = opt.param_groups[0]["lr"]
    assert isinstance(rate, torch.Tensor) and rate.dtype == torch.float32
    assert all(g["fused"] and g["lr"].device == model[0].weight.device for g in opt.param_groups)
    if name != "sgd":
        assert all(g["capturable"] for g in opt.param_groups)
    sched = StepSchedule(opt, kind="cosine", peak_lr=0.1, total_steps=10)
    for _ in range(4):
        sched.step()
    want = 0.5 * 0.1 * (1 + math.cos(math.pi * 4 / 10))  # cosine from the definition
    assert opt.param_groups[0]["lr"] is rate  # the same tensor: a captured step reads it
    assert all(float(g["lr"]) == pytest.approx(want, rel=1e-6) for g in opt.param_groups)
    assert sched.get_last_lr() == [pytest.approx(want)] * len(opt.param_groups)
    assert all(isinstance(v, float) for v in sched.get_last_lr())
    epochs = EpochSchedule(opt, kind="multistep", peak_lr=0.1, epochs=4, steps_per_epoch=2,
                           milestones=[1], gamma=0.5)
    for _ in range(2):
        epochs.step()
    assert opt.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(0.05)


def test_float_rates_stay_floats():
    opt = build_optimizer(Cfg("sgd"), torch.nn.Linear(3, 4))
    StepSchedule(opt, kind="constant", peak_lr=0.2, total_steps=3).step()
    assert opt.param_groups[0]["lr"] == 0.2 and isinstance(opt.param_groups[0]["lr"], float)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["online", "spaced"])
def test_cuda_a_graphed_run_trains_like_the_eager_one(tmp_path, mode, digits_bundle):
    """The trainer on CUDA with --cuda-graphs on and off (fp32, same seed): both finish, with the
    same steps and close losses (graphs replay the eager kernels; bf16 would widen this)."""
    import json

    from run_helpers import run, tiny_config

    rows = {}
    for graphs in ("off", "on"):
        cfg = tiny_config(tmp_path / graphs, mode=mode, epochs=2, device="cuda", amp="off",
                          channels_last="off", finite_check_every=4, cuda_graphs=graphs)
        status, out = run(cfg, data=digits_bundle)
        assert status == 0, out
        text = (tmp_path / graphs / "run" / "metrics.jsonl").read_text()
        rows[graphs] = [json.loads(line) for line in text.splitlines()]
    for off, on in zip(rows["off"], rows["on"]):
        assert (on["teacher_steps"], on["student_steps"]) == (off["teacher_steps"],
                                                              off["student_steps"])
        assert on["train_student_loss"] == pytest.approx(off["train_student_loss"], rel=1e-3)
        assert isinstance(on["lr"], float) and isinstance(on["student_lr"], float)


class _Built(Exception):
    pass


@pytest.mark.parametrize("value,on", [("on", True), ("auto", False), ("off", False)])
def test_the_trainer_passes_the_setting_and_builds_tensor_rate_optimisers(tmp_path, value, on,
                                                                          monkeypatch,
                                                                          digits_bundle):
    """build_run on CPU (the runner refuses 'on' there first): what reaches the engine."""
    from run_helpers import tiny_config

    from spacedkd_fast.train import build
    from spacedkd_fast.train.distributed import init_distributed

    seen = {}

    def spy(teacher, student, teacher_opt, student_opt, **kw):
        seen.update(kw, opts=(teacher_opt, student_opt))
        raise _Built

    monkeypatch.setattr(build, "SpacedDistiller", spy)
    # device auto: --device cpu with graphs on is refused by the configuration itself
    cfg = tiny_config(tmp_path, mode="spaced", finite_check_every=4, cuda_graphs=value,
                      device="auto")
    with pytest.raises(_Built):
        build.build_run(cfg, init_distributed("cpu"), data=digits_bundle)
    assert seen["cuda_graphs"] is on and seen["check_finite_every"] == 4
    for opt in seen["opts"]:
        rates = [g["lr"] for g in opt.param_groups]
        assert all(isinstance(r, torch.Tensor) == on for r in rates)
        assert all(g["fused"] for g in opt.param_groups)  # deferred checks need them anyway


def test_the_engine_refuses_graphs_on_cpu_models_through_build_run(tmp_path, digits_bundle):
    from run_helpers import tiny_config

    from spacedkd_fast.train.build import build_run
    from spacedkd_fast.train.distributed import init_distributed
    from spacedkd_fast.train.errors import UserError

    cfg = tiny_config(tmp_path, mode="online", finite_check_every=4, cuda_graphs="on",
                      device="auto")
    with pytest.raises(UserError, match=r"cuda_graphs need a CUDA device \(the models are on cpu"):
        build_run(cfg, init_distributed("cpu"), data=digits_bundle)
