"""The official behaviours wired into the trainer: --compat presets (the engine decides the
switches the user left open, and config.yaml records what ran), frozen teachers from a run's
weights, intermediate-feature KD, a teacher fed resized batches, BatchNorm groups and deferred
finite checks. Tiny runs on the 320-digit subset (L = 5 steps per epoch)."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F
import yaml
from run_helpers import L, run, tiny_config

from spacedkd_fast.engine.model_io import unwrap
from spacedkd_fast.engine.trace import read_trace
from spacedkd_fast.models import create
from spacedkd_fast.train import runner
from spacedkd_fast.train.build import ChannelsLastSource, build_run
from spacedkd_fast.train.checkpoint import BEST_NAME
from spacedkd_fast.train.distributed import init_distributed
from spacedkd_fast.train.errors import UserError


def _parts(cfg, data):
    return build_run(cfg, init_distributed("cpu"), data=data)


def _rules(trace_path) -> list[str]:
    return [e["rule"] for e in read_trace(trace_path) if e["event"] == "replay_start"]


def test_compat_official_gives_the_engine_the_preset_and_records_it(tmp_path, digits_bundle):
    trace = tmp_path / "t.jsonl"
    cfg = tiny_config(tmp_path, mode="spaced", interval_rate=0.4, epochs=1, compat="official",
                      kd_scale=1.0, trace=str(trace))
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    # the online_KD preset: BN updated by soft-target forwards, no tail flush, paper-code KL
    assert (saved["teacher_bn_update"], saved["flush_tail"], saved["kd_loss"]) == (True, False,
                                                                                   "paper-code")
    assert _rules(trace) == ["n % I == 0"] * (L // 2)  # I = int(5 * 0.4) = 2; tail dropped
    # a resume treats every saved key as explicit: the recorded values agree with the preset
    status = runner.resume(tmp_path / "run", overrides={"epochs": 2}, progress=False,
                           data=digits_bundle, stream=io.StringIO())
    assert status == 0


def test_a_switch_that_contradicts_the_preset_is_a_user_error(tmp_path, digits_bundle):
    cfg = tiny_config(tmp_path, mode="spaced", epochs=1, compat="official", flush_tail=True)
    with pytest.raises(UserError, match="flush_tail"):
        _parts(cfg, digits_bundle)
    cfg = tiny_config(tmp_path, mode="spaced", epochs=1, compat="official", kd_loss="fused")
    with pytest.raises(UserError, match="kd-loss"):
        _parts(cfg, digits_bundle)


def test_compat_official_vit_runs_the_vit_loop_with_one_optimiser(tmp_path, digits_bundle):
    trace = tmp_path / "t.jsonl"
    cfg = tiny_config(tmp_path, mode="spaced", interval_rate=0.6, epochs=1, optimizer="adamw",
                      lr=1e-3, compat="official-vit", trace=str(trace))
    parts = _parts(dataclasses.replace(cfg, explicit=set(cfg.explicit)), digits_bundle)
    assert parts.teacher_opt is parts.student_opt  # one AdamW over both networks
    d = parts.distiller
    assert (d.replay, d.shared_optimizer, d.kd.normalization) == ("fresh", True, "class")
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    assert set(_rules(trace)) == {"space_counter >= L * s"}
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["replay"], saved["shared_optimizer"], saved["kd_normalization"]) == (
        "fresh", True, "class")


def test_compat_official_self_kd_and_offline_fresh_passes(tmp_path, digits_bundle):
    trace = tmp_path / "s.jsonl"
    cfg = tiny_config(tmp_path, mode="spaced-self", interval_rate=0.4, epochs=1,
                      compat="official", trace=str(trace))
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    assert set(_rules(trace)) == {"(n - L) % I == 0"}
    trace2 = tmp_path / "o.jsonl"
    cfg = tiny_config(tmp_path, mode="offline", epochs=1, offline_student_data="fresh",
                      trace=str(trace2), out=str(tmp_path / "off"))
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    assert _rules(trace2) == ["offline: fresh passes, source epochs 1..1"]


def test_frozen_teacher_from_a_runs_best_student_stays_unchanged(tmp_path, digits_bundle):
    base = tiny_config(tmp_path, mode="base", epochs=1, out=str(tmp_path / "base"))
    assert run(base, data=digits_bundle)[0] == 0
    weights = torch.load(tmp_path / "base" / BEST_NAME, weights_only=True)["state_dict"]
    cfg = tiny_config(tmp_path, mode="frozen", epochs=1,
                      teacher_checkpoint=str(tmp_path / "base" / BEST_NAME))
    parts = _parts(dataclasses.replace(cfg, explicit=set(cfg.explicit)), digits_bundle)
    assert parts.teacher_opt is None
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    for name, value in weights.items():
        assert torch.equal(ckpt["models"]["teacher"][name], value), name
    wrong = tiny_config(tmp_path, mode="frozen", epochs=1, teacher_arch="resnet34",
                        teacher_checkpoint=str(tmp_path / "base" / BEST_NAME))
    with pytest.raises(UserError, match="does not fit teacher architecture 'resnet34'"):
        _parts(wrong, digits_bundle)
    with pytest.raises(UserError, match="no such file"):
        _parts(dataclasses.replace(wrong, teacher_checkpoint=str(tmp_path / "none.pt")),
               digits_bundle)


def test_intermediate_feature_kd_with_a_resized_teacher(tmp_path, digits_bundle):
    cfg = tiny_config(tmp_path, mode="online", epochs=1, arch="resnet56", model_kwargs={},
                      feature_kd="inter", inter_student_blocks=[0, 2],
                      inter_teacher_blocks=[1, 2], beta=2.5, teacher_image_size=16)
    parts = _parts(dataclasses.replace(cfg, explicit=set(cfg.explicit)), digits_bundle)
    seen = []
    unwrap(parts.teacher).model.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    key, (x, y) = next(iter(parts.source.epoch(0)))
    parts.distiller.step(key, x, y)
    want = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    assert torch.equal(seen[0], want)  # the teacher saw the batch resized to its own size
    head = parts.distiller.projector
    assert [a.in_channels for a in head.adapters] == [16, 64]
    assert [a.out_channels for a in head.adapters] == [32, 64]
    status, out = run(cfg, data=digits_bundle)
    assert status == 0, out
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"train_feat"' in rows
    bad = tiny_config(tmp_path, mode="online", epochs=1, feature_kd="inter",
                      inter_student_blocks=[0], inter_teacher_blocks=[0])
    with pytest.raises(UserError, match="no per-block features"):
        _parts(bad, digits_bundle)


def test_bn_groups_take_statistics_over_slices_as_data_parallel_did(tmp_path, digits_bundle):
    cfg = tiny_config(tmp_path, mode="base", epochs=1, bn_groups=2)
    grouped = _parts(cfg, digits_bundle).student
    plain = create("resnet18", 10, 8, downsample_factor=64)
    plain.load_state_dict(grouped.state_dict())
    _, (x, _) = next(iter(digits_bundle.train.epoch(0)))
    grouped.train()
    plain.train()
    grouped(x)
    plain(x[: x.shape[0] // 2])  # DataParallel: the running statistics follow the first half
    bn_g = next(m for m in grouped.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn_p = next(m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d))
    torch.testing.assert_close(bn_g.running_mean, bn_p.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_g.running_var, bn_p.running_var, rtol=1e-5, atol=1e-6)


def test_deferred_finite_checks_train_the_same_weights(tmp_path, digits_bundle, monkeypatch):
    # N > 1 builds fused optimisers; the N = 1 run gets fused ones too, so the runs differ only
    # in when the checks are read (fused and for-each kernels round differently)
    from spacedkd_fast.train import build

    real = build.build_optimizer
    monkeypatch.setattr(build, "build_optimizer", lambda cfg, p, fused=False: real(cfg, p,
                                                                                  fused=True))
    finals = []
    for n in (1, 4):
        cfg = tiny_config(tmp_path, mode="spaced", interval_rate=1.0, epochs=1,
                          finite_check_every=n, out=str(tmp_path / f"n{n}"))
        parts = _parts(cfg, digits_bundle)
        assert parts.student_opt.defaults["fused"] and parts.distiller.check_finite_every == n
        for key, (x, y) in parts.source.epoch(0):
            parts.distiller.step(key, x, y)
        parts.distiller.finish()
        finals.append(parts.student.state_dict())
    for name, value in finals[0].items():
        assert torch.equal(finals[1][name], value), name


def test_channels_last_source_forwards_the_second_stream(digits_bundle):
    wrapped = ChannelsLastSource(digits_bundle.train).stream(1)
    assert isinstance(wrapped, ChannelsLastSource)
    _, (x, _) = next(iter(wrapped.epoch(0)))
    _, (want, _) = next(iter(digits_bundle.train.stream(1).epoch(0)))
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, want)


def test_an_extension_that_cannot_load_is_one_line_and_exit_2(monkeypatch, capsys):
    from spacedkd_fast.train.cli import main

    def broken(*args, **kwargs):
        raise ImportError("_C.so: undefined symbol: _ZN3c10\nsecond line")

    monkeypatch.setattr(runner, "train", broken)
    assert main(["--dataset", "digits", "--device", "cpu", "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: cannot load spacedkd_fast: _C.so: undefined symbol: _ZN3c10"]
