"""``--print-config`` prints what the run will use: the same values the run's ``config.yaml``
records (the preset's switches and objective form, the data set found, the digits defaults, the
auto speed settings), checked against tiny real runs of the same command."""

from __future__ import annotations

import pytest
import yaml
from run_helpers import tiny_config

from spacedkd_fast.engine.compat import PRESETS
from spacedkd_fast.train.build import build_run
from spacedkd_fast.train.cli import main
from spacedkd_fast.train.distributed import init_distributed
from spacedkd_fast.train.preview import planned

TINY = ["--model-kwargs", "downsample_factor=16", "--epochs", "1", "--batch-size", "256",
        "--no-progress", "--log-every", "3"]


def _printed(capsys, args) -> dict:
    capsys.readouterr()
    assert main([*args, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_is_what_the_run_records(capsys, tmp_path):
    # no --dataset and no CIFAR-100 under --data-dir: the digits fallback and its defaults
    args = ["--mode", "spaced-self", "--compat", "official", "--interval-rate", "0.5", *TINY,
            "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    printed = _printed(capsys, args)
    assert main(args) == 0
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert printed == recorded
    # what settling changed from the defaults (the run found them too)
    assert (printed["dataset"], printed["lr"], printed["image_size"]) == ("digits", 0.05, 8)
    assert printed["amp"] in ("off", "bf16") and printed["channels_last"] in ("on", "off")
    assert printed["flush_tail"] is False


@pytest.mark.parametrize("compat", ["official", "official-vit"])
def test_the_pair_presets_settle_as_the_run_builds_them(compat, tmp_path, digits_bundle):
    # build_run (models, optimisers, the distiller; no training) writes back what the engine runs
    cfg = tiny_config(tmp_path, mode="spaced", epochs=1, compat=compat, optimizer="adamw")
    expected = planned(cfg).to_dict()
    build_run(cfg, init_distributed("cpu"), data=digits_bundle)
    assert cfg.to_dict() == expected
    assert cfg.flush_tail is False and cfg.compat == compat


def test_the_self_preset_is_printed_with_its_objective(capsys):
    cfg = _printed(capsys, ["--mode", "spaced-self", "--compat", "official", "--device", "cpu"])
    for name, (_, official) in PRESETS[("self", "official")].items():
        assert cfg[name] == official, name
    assert (cfg["kd_scale"], cfg["kd_loss"]) == (1.0, "fused")  # softCE without T^2


def test_an_official_vit_recipe_prints_the_presets_switches(capsys):
    # the example: this recipe printed flush_tail true and teacher_bn_update false
    cfg = _printed(capsys, ["--config", "deit-ti_c100_space_1_5", "--device", "cpu"])
    for name, (_, official) in PRESETS[("pair", "official-vit")].items():
        assert cfg[name] == official, name
    assert (cfg["kd_normalization"], cfg["amp"]) == ("class", "off")


def test_print_config_with_a_run_folder_is_refused(capsys, tmp_path):
    assert main(["--resume", str(tmp_path), "--print-config"]) == 2
    assert "config.yaml" in capsys.readouterr().err
