"""The trainer's configuration: one dataclass, YAML recipes, CLI overrides, validation.

Resolution order (later wins): the dataclass defaults (the paper's CIFAR-100 Spaced online KD
recipe for ResNet-18) < the recipe file given with ``--config`` (which may itself ``inherit`` another
recipe) < the flags given on the command line. ``TrainConfig.explicit`` remembers which keys the
user set (in a file or a flag), so that data-set defaults (``digits``: fewer epochs) only fill in
what the user left open.

Every field carries its help text and group in ``metadata``; ``spacedkd_fast.train`` builds the
argparse parser from them, so the CLI, the YAML keys and this file never disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..engine.modes import (
    MODE_NAMES,
    OFFLINE_RATE,
    PAIR_INTERVAL_RATE,
    SELF_INTERVAL_RATE,
    SELF_MODES,
    resolve_mode,
)
from ..engine.options import (
    FEATURE_EXITS,
    FEATURE_KD,
    FIRST_REPLAY,
    PRESET_NAMES,
    REPLAY_KINDS,
    STUDENT_DATA,
    TRIGGER_STEPS,
    ZERO_INTERVAL,
)
from ..ops.names import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, FEATURE_LOSSES, KD_NORMALIZATIONS
from . import recipe_files
from .config_checks import official_setting_errors, pending, value_errors
from .config_values import AUTO_ON_OFF, ConfigError, coerce
from .resume_policy import checkpoint_every_errors

# Name lists and defaults of the engine and the ops layer, from their torch-free modules (the CLI
# answers --help without loading torch or the compiled extension).
MODES = MODE_NAMES
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "cosine")
KD_LOSSES = ("fused", "paper-code")
AMP_MODES = ("auto", "off", "bf16", "fp16")  # auto: speed_defaults.py decides, once per run
COMPAT_MODES = ("none", *PRESET_NAMES)  # the engine's presets (engine/compat.py)
WEIGHT_DECAY_GROUPS = ("all", "official")  # the same names as optim.WEIGHT_DECAY_GROUPS
WARMUP_PER = ("step", "epoch")
TEACHER_FEATURES = ("live", "precomputed")

# The official code encodes the mode in the interval rate: 0 = online, >= 50 = offline.
OFFLINE_INTERVAL_RATE = OFFLINE_RATE

# Defaults used when training falls back to (or is asked for) the embedded digits data set and the
# user did not set the value: the CIFAR recipe's 80 epochs at 32 px would take hours on a laptop
# CPU; 3 epochs at the digits' native 8 px, unaugmented, show the whole pipeline working (teacher
# and student near 90% top-1) in about a minute on 2 cores with the full ResNet-18.
DIGITS_DEFAULTS: dict[str, Any] = {"epochs": 3, "batch_size": 64, "lr": 0.05, "image_size": 8,
                                   "augment": "none"}


def _opt(default: Any, help: str, group: str, *, choices: tuple | None = None,
         metavar: str | None = None, cli: bool = True, factory=None) -> Any:
    meta = {"help": help, "group": group, "choices": choices, "metavar": metavar, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


G_WHAT = "what to train"
G_DATA = "data"
G_OPT = "optimisation"
G_KD = "distillation"
G_COMPAT = "compatibility with the official code (each switch restores one official behaviour)"
G_SPEED = "speed, device and reproducibility"
G_OUT = "output"


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field names are the YAML keys; flags use dashes."""

    # what to train
    mode: str = _opt("spaced", "training mode: base (one model, CE), online KD, spaced KD, offline KD, "
                     "frozen (KD from a pretrained teacher, --teacher-checkpoint), self KD "
                     "(multi-exit BYOT network), spaced-self KD", G_WHAT, choices=MODES)
    arch: str = _opt("resnet18", "architecture of both teacher and student (self modes: the multi-exit "
                     "network; a plain name such as resnet18 maps to byot_resnet18)", G_WHAT,
                     metavar="NAME")
    teacher_arch: str | None = _opt(None, "teacher architecture, if not --arch", G_WHAT,
                                    metavar="NAME")
    student_arch: str | None = _opt(None, "student architecture, if not --arch", G_WHAT,
                                    metavar="NAME")
    model_kwargs: dict[str, Any] = _opt(None, "extra options of both models' constructors, "
                                        "KEY=VALUE,... (e.g. downsample_factor=4, drop_path_rate=0.1)",
                                        G_WHAT, metavar="K=V,...", factory=dict)
    teacher_kwargs: dict[str, Any] = _opt(None, "extra options of the teacher's constructor",
                                          G_WHAT, metavar="K=V,...", factory=dict)
    student_kwargs: dict[str, Any] = _opt(None, "extra options of the student's constructor",
                                          G_WHAT, metavar="K=V,...", factory=dict)
    # data
    dataset: str | None = _opt(None, "cifar100, cifar10, tiny-imagenet, imagenet, digits, "
                               "folder:PATH, torchvision:CLASS (any torchvision.datasets class, "
                               "e.g. torchvision:FashionMNIST, from --data-dir; --augment none, "
                               "cifar or imagenet) or MODULE:FUNCTION (your own Datasets: the "
                               "function returns (train_set, test_set[, num_classes])); auto = "
                               "cifar100 when it is on disk under --data-dir, else the embedded "
                               "digits set (announced)", G_DATA, metavar="NAME")
    data_dir: str = _opt("./data", "folder holding the data sets", G_DATA, metavar="DIR")
    augment: str | None = _opt(None, "augmentation recipe: cifar, cifar-selfkd, tiny, imagenet, vit, "
                               "vit-official (the official ViT code's RandAugment and erasing), none", G_DATA, metavar="NAME")
    image_size: int | None = _opt(None, "train and test at this image size in pixels", G_DATA, metavar="PX")
    download: bool = _opt(False, "fetch CIFAR-10/100 or a torchvision:CLASS data set through "
                          "torchvision when not under --data-dir", G_DATA)
    drop_last: bool | None = _opt(None, "drop the last incomplete training batch of each epoch: on, "
                                  "off, or the augmentation recipe's choice (vit-official: on, "
                                  "as the official ViT code: 390 steps per epoch on CIFAR-100)",
                                  G_DATA, metavar="on|off")
    data_backend: str = _opt("auto", "batch pipeline: auto, gpu (data resident on the GPU), cpu (batched torch ops), "
                             "dali, torchvision (the recipe as torchvision/timm transforms in "
                             "keyed loader workers: auto's choice for image folders and "
                             "Tiny-ImageNet on a CPU)", G_DATA,
                             metavar="NAME")
    # optimisation
    epochs: int = _opt(80, "training epochs (offline mode: the teacher's, then as many for the "
                       "student)", G_OPT, metavar="N")
    batch_size: int = _opt(128, "global batch size (split across processes under torchrun)",
                           G_OPT, metavar="N")
    optimizer: str = _opt("sgd", "optimiser of every model", G_OPT, choices=OPTIMIZERS)
    lr: float = _opt(0.01, "peak learning rate", G_OPT, metavar="LR")
    momentum: float = _opt(0.9, "SGD momentum", G_OPT, metavar="M")
    nesterov: bool = _opt(False, "SGD with Nesterov momentum (official ViT code's ResNets)", G_OPT)
    weight_decay: float = _opt(5e-4, "weight decay", G_OPT, metavar="WD")
    weight_decay_groups: str = _opt("all", "which tensors are decayed: all, or official (not "
                                    "biases, 1-D tensors, class/distillation tokens and position "
                                    "embeddings; official ViT code)", G_OPT,
                                    choices=WEIGHT_DECAY_GROUPS)
    schedule: str = _opt("constant", "learning-rate schedule (see --warmup-per)", G_OPT,
                         choices=SCHEDULES)
    warmup_epochs: float = _opt(0.0, "linear warm-up to --lr over this many epochs", G_OPT,
                                metavar="E")
    warmup_per: str = _opt("step", "step: warm-up and schedule evaluated at every optimiser step; "
                           "epoch: once per epoch, like timm's schedulers in the official ViT code "
                           "(whose cosine spans all epochs, warm-up included)", G_OPT,
                           choices=WARMUP_PER)
    warmup_start_factor: float | None = _opt(None, "the warm-up starts at this fraction of --lr "
                                             "(official ViT: 0.001); default: lr/warm-up steps "
                                             "(per step), 0 (per epoch)", G_OPT, metavar="F")
    min_lr: float = _opt(0.0, "final learning rate of the cosine schedule", G_OPT, metavar="LR")
    milestones: list[float] = _opt(None, "multistep: epochs at which the rate is multiplied by "
                                   "--gamma (comma separated)", G_OPT, metavar="E,E,...",
                                   factory=list)
    gamma: float = _opt(0.1, "multistep: factor applied at each milestone", G_OPT, metavar="G")
    # distillation
    interval_rate: float = _opt(PAIR_INTERVAL_RATE, "space interval s in epochs (the student "
                                f"replays every int(L*s) steps; default {PAIR_INTERVAL_RATE:g}, "
                                f"and {SELF_INTERVAL_RATE:g} with --mode spaced-self: the paper's "
                                "values); official convention accepted: 0 means online "
                                "(self), >= 50 means offline", G_KD, metavar="S")
    temperature: float = _opt(DEFAULT_TEMPERATURE, "softmax temperature T of the KD term", G_KD,
                              metavar="T")
    alpha: float = _opt(DEFAULT_ALPHA, "weight of the KD term: (1-alpha)*CE + alpha*kd_scale*KL",
                        G_KD, metavar="A")
    beta: float = _opt(0.03, "weight of the feature loss (0 turns it off)", G_KD, metavar="B")
    kd_scale: float | None = _opt(None, "factor on the KL term; 't2' means T*T (Hinton); the "
                                  "official code uses 1", G_KD, metavar="K")
    kd_normalization: str = _opt("batch", "KL term averaged over the batch, or also divided by "
                                 "the number of classes (class: official ViT code)", G_KD,
                                 choices=KD_NORMALIZATIONS)
    feature_loss: str = _opt("dist", "feature loss between projected student and teacher "
                             "features: dist = unsquared L2 norm of the whole difference", G_KD,
                             choices=FEATURE_LOSSES)
    kd_loss: str = _opt("fused", "KD objective: fused KL kernel, or paper-code (the official "
                        "code's probabilities-into-KLDivLoss objective, plain torch)", G_KD,
                        choices=KD_LOSSES)
    feature_kd: str = _opt("penultimate", "features the feature loss compares: penultimate "
                           "(projected pooled features, official CNN code) or inter (per-block "
                           "maps through 1x1 adapters, resized to the larger grid; official ViT "
                           "*_ours configs)", G_KD, choices=FEATURE_KD)
    inter_student_blocks: list[int] = _opt(None, "feature_kd inter: student blocks whose outputs "
                                           "are matched (e.g. 0,6,11)", G_KD, metavar="I,I,...",
                                           factory=list)
    inter_teacher_blocks: list[int] = _opt(None, "feature_kd inter: the teacher blocks they are "
                                           "matched with, pairwise (e.g. 0,1,2)", G_KD,
                                           metavar="J,J,...", factory=list)
    teacher_checkpoint: str | None = _opt(None, "mode frozen: the pretrained teacher's weights (a "
                                          "run's best_student.pt or checkpoint.pt)", G_KD,
                                          metavar="FILE")
    teacher_image_size: int | None = _opt(None, "the teacher sees each batch resized (bilinear) to "
                                          "this size (official: ResNet-56 teacher at 32 px)",
                                          G_KD, metavar="PX")
    teacher_features: str = _opt("live", "feature_kd inter: teacher maps computed on each batch "
                                 "(live), or once per image and cropped/flipped like it "
                                 "(precomputed: official deit-ti_c100_ours_offline; mode frozen, "
                                 "alpha 0; cached beside --teacher-checkpoint, built when "
                                 "missing or by python -m spacedkd_fast.train.cache_features)",
                                 G_KD,
                                 choices=TEACHER_FEATURES)
    # compatibility switches
    compat: str = _opt("none", "turn on every official behaviour of a code base: official (the "
                       "online_KD code, or self_KD for the self modes) or official-vit (the vit "
                       "code); the switches below restore one each", G_COMPAT,
                       choices=COMPAT_MODES)
    shared_optimizer: bool = _opt(False, "one optimiser over teacher and student, so that the "
                                  "idle network still decays and moves on the other's steps "
                                  "(official ViT code)", G_COMPAT)
    teacher_bn_update: bool = _opt(False, "let teacher forwards for soft targets update the "
                                   "teacher's BatchNorm running statistics (official)", G_COMPAT)
    flush_tail: bool = _opt(True, "replay the batches left unreplayed at the end of training "
                            "(--no-flush-tail drops them like the official code)", G_COMPAT)
    replay: str = _opt("keyed", "keyed: the student replays the teacher's batches; fresh: the "
                       "student trains on new batches (official ViT code)", G_COMPAT,
                       choices=REPLAY_KINDS)
    self_kd_first_replay: str = _opt("interval", "spaced self KD: first replay after the "
                                     "interval, after one epoch, or official (the official "
                                     "counter (n - L) %% I == 0, also inside the first epoch)",
                                     G_COMPAT, choices=FIRST_REPLAY)
    self_kd_trigger_step: str = _opt("ce-and-kd", "spaced self KD: the batch that triggers a "
                                     "replay gets a CE step and its KD step, or only the KD step "
                                     "(official)", G_COMPAT, choices=TRIGGER_STEPS)
    self_kd_trigger_forward: bool = _opt(False, "spaced self KD with --self-kd-trigger-step "
                                         "kd-only: the trigger batch still goes through one "
                                         "train-mode forward, outputs discarded, which moves "
                                         "BatchNorm's running statistics (official)", G_COMPAT)
    offline_student_data: str = _opt("replay", "offline KD: the student replays the teacher's "
                                     "batches, or trains on fresh passes of the data (official)",
                                     G_COMPAT, choices=STUDENT_DATA)
    zero_interval: str = _opt("error", "an interval int(L*s) of 0 steps is an error, or runs "
                              "online KD (official)", G_COMPAT, choices=ZERO_INTERVAL)
    frozen_teacher_mode: str = _opt("eval", "mode frozen: the teacher gives soft targets in eval "
                                    "mode, or in train mode with drop path on (official ViT code)",
                                    G_COMPAT, choices=("eval", "train"))
    kd_second_forward: bool = _opt(False, "students without a distillation head get their KD "
                                   "logits from a second forward pass (official ViT code)",
                                   G_COMPAT)
    self_kd_feature_exits: str = _opt("all", "self KD feature loss on all shallow exits, or "
                                      "skipping the layer-3 exit (official)", G_COMPAT,
                                      choices=FEATURE_EXITS)
    bn_groups: int = _opt(1, "BatchNorm statistics over N equal slices of each training batch, as "
                          "N-way DataParallel computed them (the official CNN runs: 2 GPUs, so "
                          "2; not part of --compat)", G_COMPAT, metavar="N")
    # speed and reproducibility
    finite_check_every: int = _opt(1, "read the loss-is-finite checks every N steps instead of "
                                   "before each step; N > 1 builds fused optimisers (which round "
                                   "slightly differently), needs amp off or bf16 and one process, "
                                   "and is refused for the self modes (torch's fused SGD fails "
                                   "on their late-starting exits)", G_SPEED, metavar="N")
    seed: int = _opt(0, "seed of weights, data order and augmentation", G_SPEED, metavar="N")
    seeds: str = _opt("", "run once per seed, e.g. 0,1,2 (replaces --seed; empty: --seed only)",
                      G_SPEED, metavar="N,N,...")
    device: str = _opt("auto", "cpu, cuda, cuda:N; auto = cuda when available", G_SPEED,
                       metavar="DEV")
    threads: int = _opt(0, "CPU threads of torch's intra-op work; 0 = auto: OMP_NUM_THREADS when "
                        "set, else torch's default (the physical cores) capped at the cores this "
                        "process may use and shared among the processes of a CPU torchrun job; "
                        "the run header prints the number and config.yaml records it", G_SPEED,
                        metavar="N")
    amp: str = _opt("auto", "autocast dtype (fp16 adds a GradScaler); auto = bf16 on CUDA when "
                    "every model is a CNN and --compat is none, else off (fp32)", G_SPEED,
                    choices=AMP_MODES)
    channels_last: str = _opt("auto", "channels_last memory format for models and batches; auto "
                              "= on when amp resolves to bf16/fp16 for a CNN run on CUDA, else off",
                              G_SPEED, choices=AUTO_ON_OFF)
    compile: bool = _opt(False, "torch.compile the models", G_SPEED)
    deterministic: bool = _opt(False, "deterministic algorithms only (slower on CUDA)", G_SPEED)
    overlap: str = _opt("auto", "run the student's replay concurrently with the teacher's next "
                        "interval (auto: on CUDA when no loss is read before every step, i.e. with "
                        "--finite-check-every N > 1; with that read it does not pay)", G_SPEED,
                        choices=AUTO_ON_OFF)
    cuda_graphs: str = _opt("auto", "capture the teacher's and the student's training steps as "
                            "CUDA graphs and replay them (auto: off until capture is verified "
                            "on a GPU)", G_SPEED, choices=AUTO_ON_OFF)
    # output
    out: str | None = _opt(None, "output folder (auto: runs/<time>-<mode>-<arch>-<data>)", G_OUT,
                           metavar="DIR")
    trace: str | None = _opt(None, "write the engine's JSONL trace (steps, replays, batch "
                             "checksums) to FILE", G_OUT, metavar="FILE")
    log_every: int = _opt(50, "read the loss accumulators from the device every N steps",
                          G_OUT, metavar="N")
    checkpoint_every: str = _opt("epoch", "also write OUT/checkpoint.pt within an epoch: every N "
                                 "global steps (500) or every so much time (10m, 90s, 1h; taken "
                                 "at the next --log-every point); epoch: at epoch ends only "
                                 "(always written there)", G_OUT, metavar="N|10m")
    tensorboard: bool = _opt(False, "also log to TensorBoard under OUT/tensorboard", G_OUT)
    wandb: bool = _opt(False, "also log to Weights & Biases (needs wandb installed and a login)",
                       G_OUT)
    wandb_project: str = _opt("spacedkd", "Weights & Biases project", G_OUT, metavar="NAME")
    compare: str | None = _opt(None, "another run's output folder (e.g. the online run) to report "
                               "the gain against in the summary", G_OUT, metavar="DIR")
    description: str = _opt("", "free text (recipes describe themselves here)", G_OUT, cli=False)

    # keys set by a recipe file or a flag (not a configuration value itself)
    explicit: set[str] = field(default_factory=set, repr=False, compare=False,
                               metadata={"cli": False, "internal": True})

    # ------------------------------------------------------------------ derived values
    @property
    def is_self(self) -> bool:
        return self.mode in SELF_MODES

    @property
    def teacher(self) -> str:
        return self.teacher_arch or self.arch

    @property
    def student(self) -> str:
        return self.student_arch or self.arch

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain YAML-able values (no internal bookkeeping)."""
        out = {}
        for f in fields(self):
            if f.metadata.get("internal"):
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
        return out


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig) if not f.metadata.get("internal"))
_FIELDS = {f.name: f for f in fields(TrainConfig)}


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """A recipe file's settings, ``inherit:`` chains followed (see :mod:`.recipe_files`)."""
    return recipe_files.load_yaml(name_or_path, FIELD_NAMES)


def build_config(file_values: dict[str, Any] | None = None,
                 cli_values: dict[str, Any] | None = None, *, runnable: bool = True) -> TrainConfig:
    """Defaults, then ``file_values`` (from a recipe), then ``cli_values``; validated.

    ``runnable``: also refuse what the trainer cannot run yet (:func:`check_runnable`); pass False
    to look at a configuration (``--print-config``) without running it.
    """
    cfg = TrainConfig()
    for source in (file_values or {}, cli_values or {}):
        for k, v in source.items():
            k = k.replace("-", "_")
            if k not in FIELD_NAMES:
                raise ConfigError(f"unknown setting {k!r}")
            setattr(cfg, k, _coerce(k, v))
            cfg.explicit.add(k)
    normalise(cfg)
    validate(cfg)
    if runnable:
        check_runnable(cfg)
    return cfg


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A configuration saved by ``to_dict`` (a run's config.yaml or checkpoint), validated.

    Every saved key counts as explicit: a resumed run never re-applies data-set defaults.
    """
    return build_config(values)


def _coerce(name: str, value: Any) -> Any:
    """Turn YAML / CLI values into the field's type, with an error that names the setting."""
    f = _FIELDS[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        if "None" in str(f.type):
            return None
        raise ConfigError(f"{name} cannot be empty")
    try:
        return coerce(name, value, default, str(f.type), f.metadata.get("choices"))
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot use {value!r} (expected {f.type})") from None


def normalise(cfg: TrainConfig) -> None:
    """Apply the official interval-rate convention and canonical spellings, in place."""
    cfg.mode = cfg.mode.strip().lower()
    cfg.amp = str(cfg.amp).lower()
    if cfg.amp in ("none", "false", "no", "fp32"):
        cfg.amp = "off"
    if cfg.dataset is not None and ":" not in cfg.dataset:  # folder:, torchvision:, module: keep case
        cfg.dataset = cfg.dataset.strip().lower()
    if cfg.mode == "spaced-self" and "interval_rate" not in cfg.explicit:
        cfg.interval_rate = SELF_INTERVAL_RATE  # the paper's self-KD interval, not the pair's
    # The official code selects the mode through the interval rate (0: online / plain self KD,
    # >= 50: offline); the engine's mode table owns that convention (torch-free).
    try:
        cfg.mode = resolve_mode(cfg.mode, cfg.interval_rate, self_kd=cfg.mode in SELF_MODES)
    except (TypeError, ValueError):
        pass  # validate() names the value that makes no sense


def validate(cfg: TrainConfig) -> None:
    """Raise ``ConfigError`` naming every value that makes no sense (all of them at once)."""
    errors = value_errors(cfg) + official_setting_errors(cfg) + checkpoint_every_errors(cfg)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def check_runnable(cfg: TrainConfig) -> None:
    """Raise ``ConfigError`` naming each setting the trainer cannot run yet and what it needs
    (``config_checks.PENDING``); the official recipes record such settings as the official code
    has them."""
    missing = pending(cfg)
    if missing:
        raise ConfigError("this configuration cannot run yet (see it with --print-config):\n  - "
                          + "\n  - ".join(missing))


def apply_dataset_defaults(cfg: TrainConfig, dataset_name: str) -> list[str]:
    """Fill the digits defaults into values the user left open; returns what changed, for the log."""
    if dataset_name != "digits":
        return []
    changed = []
    for key, value in DIGITS_DEFAULTS.items():
        if key in cfg.explicit or getattr(cfg, key) == value:
            continue
        setattr(cfg, key, value)
        changed.append(f"{key} {value}")
    validate(cfg)
    return changed


def print_config(cfg: TrainConfig, stream: Any = None) -> None:
    """Print the resolved configuration as YAML (what ``--print-config`` shows; reusable as a
    recipe with ``--config``)."""
    import sys

    stream = sys.stdout if stream is None else stream
    stream.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved configuration (every field) so that the run can be reproduced."""
    text = ("# resolved configuration of this run; reuse with --config FILE --out NEW_FOLDER (this\n"
            "# run's folder holds its checkpoint; continue it with --resume instead)\n")
    text += yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    Path(path).write_text(text)
