"""The trainer's configuration: defaults = the paper's recipe, recipes, CLI overrides, validation."""

from __future__ import annotations

import pytest
import yaml

from spacedkd_fast.train.cli import build_parser, config_from_args, main, parse
from spacedkd_fast.train.config import (
    DIGITS_DEFAULTS,
    FIELD_NAMES,
    ConfigError,
    TrainConfig,
    apply_dataset_defaults,
    build_config,
    from_dict,
    load_yaml,
    save_yaml,
)
from spacedkd_fast.train.recipe_files import list_recipes


def test_defaults_are_the_papers_cifar100_spaced_recipe():
    # SPEC section 5: online/spaced CNN recipe on CIFAR-100, except the KL factor: the package's
    # one objective default is kd_scale = T*T (None); the paper's recipes set 1 explicitly.
    cfg = build_config()
    assert (cfg.mode, cfg.arch, cfg.interval_rate) == ("spaced", "resnet18", 1.5)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (cfg.schedule, cfg.batch_size, cfg.epochs) == ("constant", 128, 80)
    assert (cfg.temperature, cfg.alpha, cfg.beta, cfg.kd_scale) == (3.0, 0.3, 0.03, None)
    assert cfg.flush_tail and not cfg.teacher_bn_update and cfg.replay == "keyed"
    assert cfg.explicit == set()


def test_the_shipped_recipe_file_equals_the_defaults():
    recipe = build_config(load_yaml("cifar100-resnet18-spaced"))
    defaults = build_config({"dataset": "cifar100", "augment": "cifar", "kd_scale": 1.0})
    assert recipe.to_dict() | {"description": ""} == defaults.to_dict()


REQUIRED_RECIPES = [
    "cifar100-resnet18-online", "cifar100-resnet18-spaced", "cifar100-resnet18-offline",
    "cifar100-resnet18-base", "cifar100-byot-resnet18-self", "cifar100-byot-resnet18-spaced-self",
    "tiny-imagenet-resnet18-online", "tiny-imagenet-resnet18-spaced",
    "tiny-imagenet-byot-resnet18-self", "tiny-imagenet-byot-resnet18-spaced-self",
    *[f"{d}-deit-tiny-{m}" for d in ("cifar100", "tiny-imagenet")
      for m in ("base", "online", "spaced0.5", "spaced1.0", "spaced1.5", "spaced2.0")],
    *[f"{d}-{a}-spaced1.5" for d in ("cifar100", "tiny-imagenet") for a in ("pit-tiny", "pvtv2-b0")],
]


@pytest.mark.parametrize("name", REQUIRED_RECIPES)
def test_every_required_recipe_loads_validates_and_uses_registered_models(name):
    from spacedkd_fast.models import list_models

    cfg = build_config(load_yaml(name))
    assert name in list_recipes() and list_recipes()[name]
    arch = cfg.arch
    assert arch in list_models(), f"{name}: {arch} is not a registered model"


def test_recipe_values_follow_the_spec():
    vit = build_config(load_yaml("cifar100-deit-tiny-spaced1.5"))
    assert (vit.optimizer, vit.lr, vit.weight_decay, vit.schedule) == ("adamw", 5e-4, 0.05, "cosine")
    assert (vit.warmup_epochs, vit.min_lr, vit.epochs, vit.image_size) == (20, 5e-6, 300, 224)
    assert (vit.temperature, vit.alpha, vit.augment, vit.mode) == (1.0, 0.5, "vit-official", "spaced")
    selfkd = build_config(load_yaml("cifar100-byot-resnet18-spaced-self"))
    assert (selfkd.mode, selfkd.interval_rate, selfkd.augment) == ("spaced-self", 4.0, "cifar-selfkd")
    assert build_config(load_yaml("cifar100-resnet18-online")).mode == "online"
    assert build_config(load_yaml("cifar100-resnet18-offline")).mode == "offline"
    assert build_config(load_yaml("tiny-imagenet-resnet18-spaced")).dataset == "tiny-imagenet"
    for s in ("0.5", "1.0", "2.0"):
        assert build_config(load_yaml(f"tiny-imagenet-deit-tiny-spaced{s}")).interval_rate == float(s)


def test_flags_override_the_file_and_are_marked_explicit(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("inherit: cifar100-resnet18-online\nepochs: 7\nlr: 0.2\n")
    ns, cli = parse(["--config", str(path), "--lr", "0.3", "--no-flush-tail", "--milestones", "2,4"])
    cfg = config_from_args(ns, cli)
    assert (cfg.mode, cfg.epochs, cfg.lr, cfg.flush_tail) == ("online", 7, 0.3, False)
    assert cfg.milestones == [2.0, 4.0]
    assert {"epochs", "lr", "flush_tail", "mode"} <= cfg.explicit


def test_unknown_yaml_key_names_close_matches(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("epocs: 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'epocs'.*did you mean epochs"):
        load_yaml(str(path))


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="cifar100-resnet18-spaced"):
        load_yaml("cifar100-resnet18-spacd")


def test_inheritance_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text(f"inherit: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"inherit: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_yaml(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("values, message", [
    ({"epochs": 0}, "epochs must be greater than zero"),
    ({"batch_size": -4}, "batch_size must be greater than zero"),
    ({"lr": 0}, "lr must be greater than zero"),
    ({"temperature": -1}, "temperature must be greater than zero"),
    ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
    ({"beta": -0.1}, "beta must be zero or more"),
    ({"interval_rate": -1, "mode": "online"}, "interval_rate must be zero or more"),
    ({"mode": "sideways"}, "mode='sideways' is not one of"),
    ({"amp": "fp8"}, "amp='fp8' is not one of"),
    ({"warmup_epochs": 5, "epochs": 5}, "warmup_epochs .* must be shorter"),
    ({"schedule": "multistep"}, "needs --milestones"),
    ({"mode": "self", "teacher_arch": "resnet34"}, "trains one multi-exit network"),
    ({"epochs": "many"}, "epochs: cannot use 'many'"),
    ({"log_every": 0}, "log_every must be greater than zero"),
])
def test_values_that_make_no_sense_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values)


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        build_config({"epochs": 0, "lr": -1})
    assert "epochs" in str(err.value) and "lr" in str(err.value)


@pytest.mark.parametrize("values, mode", [
    ({"interval_rate": 0}, "online"),
    ({"interval_rate": 60}, "offline"),
    ({"interval_rate": 2.0}, "spaced"),
    ({"mode": "spaced-self", "interval_rate": 0}, "self"),
    ({"mode": "online", "interval_rate": 1.5}, "online"),
])
def test_official_interval_rate_convention(values, mode):
    assert build_config(values).mode == mode


def test_kd_scale_t2_means_hinton_and_kwargs_parse():
    ns, cli = parse(["--kd-scale", "t2", "--model-kwargs", "downsample_factor=4,drop_rate=0.1"])
    cfg = config_from_args(ns, cli)
    assert cfg.kd_scale is None
    assert cfg.model_kwargs == {"downsample_factor": 4, "drop_rate": 0.1}


def test_digits_defaults_fill_only_what_the_user_left_open():
    cfg = build_config({"epochs": 5})
    changed = apply_dataset_defaults(cfg, "digits")
    assert cfg.epochs == 5 and "epochs" not in " ".join(changed)
    for key, value in DIGITS_DEFAULTS.items():
        if key != "epochs":
            assert getattr(cfg, key) == value
    cifar = build_config()
    assert apply_dataset_defaults(cifar, "cifar100") == [] and cifar.epochs == 80


def test_saved_yaml_round_trips(tmp_path):
    cfg = build_config({"mode": "online", "milestones": [3, 6], "schedule": "multistep",
                        "kd_scale": "t2", "model_kwargs": {"downsample_factor": 4}})
    save_yaml(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert set(raw) == set(FIELD_NAMES)
    assert from_dict(raw).to_dict() == cfg.to_dict()
    assert load_yaml(str(tmp_path / "config.yaml")) == raw


def test_every_field_has_a_flag_with_its_default_in_help():
    text = build_parser().format_help()
    for name in FIELD_NAMES:
        if name == "description":
            continue
        assert "--" + name.replace("_", "-") in text
    assert "(default: 80; digits default: 3)" in text
    assert "(default: 0.01; digits default: 0.05)" in text


def test_list_recipes_prints_every_recipe(capsys):
    assert main(["--list-recipes"]) == 0
    out = capsys.readouterr().out
    for name in REQUIRED_RECIPES:
        assert name in out


def test_dataclass_defaults_are_valid():
    TrainConfig()  # constructing never raises; validation is explicit
    build_config()


def test_objective_defaults_are_the_packages_one_default():
    # config.py mirrors the ops layer's constants so that --help needs no torch
    from spacedkd_fast.ops.losses import DEFAULT_ALPHA, DEFAULT_TEMPERATURE
    from spacedkd_fast.ops.objective import KDObjective

    cfg = build_config()
    assert (cfg.temperature, cfg.alpha) == (DEFAULT_TEMPERATURE, DEFAULT_ALPHA)
    objective = KDObjective()
    assert (objective.temperature, objective.alpha) == (cfg.temperature, cfg.alpha)
    assert cfg.kd_scale is None and objective.kd_scale is None  # both mean T*T


def test_settings_of_the_official_recipes_parse_from_flags():
    ns, cli = parse(["--download", "--drop-last", "on", "--seeds", "0,1,2", "--feature-kd", "inter",
                     "--inter-student-blocks", "0,6,11", "--inter-teacher-blocks", "0,1,2",
                     "--warmup-per", "epoch", "--warmup-start-factor", "0.001",
                     "--weight-decay-groups", "official", "--teacher-image-size", "32",
                     "--mode", "frozen", "--teacher-checkpoint", "t.pt", "--optimizer", "sgd",
                     "--nesterov",
                     "--compat", "official", "--kd-normalization", "class"])
    cfg = build_config({}, cli, runnable=False)
    assert cfg.download and cfg.drop_last and cfg.nesterov and cfg.seeds == "0,1,2"
    assert (cfg.inter_student_blocks, cfg.inter_teacher_blocks) == ([0, 6, 11], [0, 1, 2])
    assert (cfg.warmup_per, cfg.warmup_start_factor, cfg.teacher_image_size) == ("epoch", 0.001, 32)
    assert (cfg.weight_decay_groups, cfg.compat, cfg.kd_normalization) == ("official", "official",
                                                                           "class")
    assert build_config({"seeds": [3, 1]}).seeds == "3,1"


@pytest.mark.parametrize("values, message", [
    ({"nesterov": True, "optimizer": "adamw"}, "nesterov needs --optimizer sgd"),
    ({"warmup_per": "epoch", "warmup_epochs": 2.5}, "whole number of warmup_epochs"),
    ({"warmup_start_factor": 2.0}, r"warmup_start_factor must lie in \[0, 1\]"),
    ({"seeds": "0,x"}, "seeds must be comma-separated whole numbers"),
    ({"seeds": "1,1"}, "seeds must be distinct"),
    ({"feature_kd": "inter", "inter_student_blocks": [0, 6]}, "of the same, non-zero length"),
    ({"mode": "online", "teacher_checkpoint": "t.pt"}, "use --mode frozen with --teacher-check"),
    ({"mode": "frozen"}, "mode frozen distils from a pretrained teacher"),
    ({"mode": "base", "shared_optimizer": True}, "shared_optimizer needs a teacher"),
    ({"teacher_features": "precomputed"}, "is for --feature-kd inter"),
    ({"inter_student_blocks": "0,x"}, "inter_student_blocks: cannot use"),
    ({"compat": "paper"}, "compat='paper' is not one of"),
])
def test_official_settings_that_make_no_sense_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values, runnable=False)


def test_settings_the_trainer_cannot_run_yet_are_refused_by_name(monkeypatch):
    from spacedkd_fast.train import config_checks

    values = {"mode": "frozen", "compat": "official-vit", "teacher_checkpoint": "t.pt",
              "feature_kd": "inter", "inter_student_blocks": [0], "inter_teacher_blocks": [0],
              "teacher_features": "precomputed", "alpha": 0.0}
    assert build_config(values).teacher_features == "precomputed"  # nothing is pending today
    monkeypatch.setattr(config_checks, "PENDING", (
        (lambda c: c.teacher_features == "precomputed", "teacher_features=precomputed",
         "a piece not written yet"),))
    with pytest.raises(ConfigError) as err:
        build_config(values)
    assert "teacher_features=precomputed: not supported yet, needs a piece" in str(err.value)
    assert build_config(values, runnable=False).compat == "official-vit"  # printable
    values["teacher_features"] = "live"
    assert build_config(values).mode == "frozen"  # every other official setting runs


@pytest.mark.parametrize("values, message", [
    ({"finite_check_every": 4, "amp": "fp16"}, "cannot run with --amp fp16"),
    ({"finite_check_every": 4, "mode": "self"}, "use --finite-check-every 1 for the self modes"),
    ({"finite_check_every": 0}, "finite_check_every must be greater than zero"),
    ({"bn_groups": 0}, "bn_groups must be greater than zero"),
])
def test_speed_and_bn_settings_that_cannot_run_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values, runnable=False)


def test_print_config_is_yaml_that_rebuilds_the_same_configuration(capsys, tmp_path):
    from spacedkd_fast.train.config import print_config

    cfg = build_config(load_yaml("deit-ti_c100_space_1_5"), runnable=False)
    print_config(cfg)
    text = capsys.readouterr().out
    assert set(yaml.safe_load(text)) == set(FIELD_NAMES)
    (tmp_path / "again.yaml").write_text(text)
    again = build_config(load_yaml(str(tmp_path / "again.yaml")), runnable=False)
    assert again.to_dict() == cfg.to_dict()


def test_inherit_takes_a_list_and_shared_files_are_not_listed(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 0.1\nepochs: 3\ndescription: a\n")
    (tmp_path / "b.yaml").write_text("lr: 0.2\n")
    (tmp_path / "c.yaml").write_text(f"inherit: [{tmp_path / 'a.yaml'}, {tmp_path / 'b.yaml'}]\n"
                                     "epochs: 5\n")
    assert load_yaml(str(tmp_path / "c.yaml")) == {"lr": 0.2, "epochs": 5}
    assert "_vit" not in list_recipes() and load_yaml("_vit")["optimizer"] == "adamw"


def test_importing_the_configuration_does_not_import_torch():
    # the CLI answers --help without loading torch or the compiled extension
    import subprocess
    import sys

    code = ("import sys, spacedkd_fast.train.config, spacedkd_fast.train.cli; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_list_models_answers_without_torch_and_matches_the_registry():
    import subprocess
    import sys

    from spacedkd_fast.models import describe_models

    code = ("import sys; from spacedkd_fast.train.cli import main; main(['--list-models']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "False"
    listed = {line.split()[0] for line in lines[:-1]}
    assert listed == set(describe_models())
    assert "5,563,400 params" in describe_models()["deit_tiny_distilled"]


def test_name_lists_are_the_engines_own():
    # config.py takes them from the engine's torch-free modules: one definition
    from spacedkd_fast.engine import modes, options
    from spacedkd_fast.ops import names
    from spacedkd_fast.train import config

    assert config.MODES is modes.MODE_NAMES and config.REPLAY_KINDS is options.REPLAY_KINDS
    assert config.FEATURE_LOSSES is names.FEATURE_LOSSES
    assert config.DEFAULT_TEMPERATURE is names.DEFAULT_TEMPERATURE


@pytest.mark.parametrize("mode", ["base", "online", "spaced", "offline", "frozen", "self",
                                  "spaced-self"])
@pytest.mark.parametrize("rate", [0, 0.5, 1.5, 49.9, 50, 60])
def test_interval_rate_convention_agrees_with_the_engines(mode, rate):
    from spacedkd_fast.engine.modes import resolve_mode

    self_kd = mode in ("self", "spaced-self")
    try:
        want = resolve_mode(mode, rate, self_kd=self_kd)
    except ValueError:  # spaced-self at >= 50: the engine refuses, so does the configuration
        with pytest.raises(ConfigError, match="interval_rate"):
            build_config({"mode": mode, "interval_rate": rate})
        return
    extra = {"teacher_checkpoint": "t.pt"} if mode == "frozen" else {}
    assert build_config({"mode": mode, "interval_rate": rate, **extra}, runnable=False).mode == want


def test_the_default_output_folder_has_no_colon():
    from spacedkd_fast.train.runner import default_out

    cfg = TrainConfig()
    for dataset, part in [("torchvision:FashionMNIST", "torchvision-FashionMNIST"),
                          ("mypkg.sets:make", "mypkg.sets-make"), ("folder:/data/x", "_data_x")]:
        out = default_out(cfg, dataset)
        assert ":" not in out and out.endswith(part), out


def test_spaced_self_defaults_to_the_papers_self_kd_interval():
    # SPEC: s = 1.5 for online KD, s = 4.0 for self KD (the numbers, not our constants)
    assert build_config(None, {"mode": "spaced"}).interval_rate == 1.5
    assert build_config(None, {"mode": "spaced-self"}).interval_rate == 4.0
    assert build_config(None, {"mode": "spaced-self", "interval_rate": 1.5}).interval_rate == 1.5
    assert build_config({"mode": "spaced-self", "interval_rate": 2.0}, {}).interval_rate == 2.0
