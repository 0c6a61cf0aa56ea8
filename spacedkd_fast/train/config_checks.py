"""Rules for the settings that the official recipes brought in, and what cannot run yet.

Kept apart from ``config.py`` so that the list of official behaviours still missing from the
trainer (:data:`PENDING`) is one short table: delete an entry when its piece lands. Both functions
take a ``TrainConfig`` and return messages; ``config.py`` raises them as one ``ConfigError``.
No torch here (the CLI answers ``--help`` without it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from ..engine.modes import OFFLINE_RATE
from ..engine.options import GRAPHED_MODES

# (what the configuration asks for, the piece of the trainer that is missing). A configuration that
# matches an entry can still be printed (--print-config) but not run.
# Empty since the precomputed teacher maps landed: every official recipe runs.
PENDING: tuple[tuple[Callable[[Any], bool], str, str], ...] = ()


def pending(cfg: Any) -> list[str]:
    """One line per setting of ``cfg`` that the trainer cannot run yet, naming the missing piece."""
    return [f"{setting}: not supported yet, needs {piece}"
            for applies, setting, piece in PENDING if applies(cfg)]


def value_errors(cfg: Any) -> list[str]:
    """Messages for values that make no sense on their own or with the mode (empty: fine)."""
    errors: list[str] = []
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            errors.append(f"{f.name}={value!r} is not one of: {', '.join(choices)}")

    def positive(name: str, *, allow_zero: bool = False) -> None:
        value = getattr(cfg, name)
        if value is None:
            return
        bad = (value < 0 if allow_zero else value <= 0) or (isinstance(value, float)
                                                            and not math.isfinite(value))
        if bad:
            need = "zero or more" if allow_zero else "greater than zero"
            errors.append(f"{name} must be {need}, got {value}")

    for name in ("epochs", "batch_size", "lr", "temperature", "log_every", "image_size",
                 "bn_groups", "finite_check_every"):
        positive(name)
    for name in ("momentum", "weight_decay", "beta", "warmup_epochs", "min_lr", "interval_rate",
                 "gamma", "seed", "threads"):
        positive(name, allow_zero=True)
    if cfg.kd_scale is not None:
        positive("kd_scale", allow_zero=True)
    if not 0.0 <= cfg.alpha <= 1.0:
        errors.append(f"alpha must lie in [0, 1], got {cfg.alpha}")
    if cfg.warmup_epochs >= cfg.epochs > 0:
        errors.append(f"warmup_epochs ({cfg.warmup_epochs}) must be shorter than epochs "
                      f"({cfg.epochs})")
    if cfg.mode in ("spaced", "spaced-self") and not 0 < cfg.interval_rate < OFFLINE_RATE:
        errors.append(f"{cfg.mode} mode needs 0 < interval_rate < {OFFLINE_RATE:g}, got "
                      f"{cfg.interval_rate}")
    if any(m <= 0 for m in cfg.milestones):
        errors.append(f"milestones must be positive epochs, got {cfg.milestones}")
    if cfg.schedule == "multistep" and not cfg.milestones:
        errors.append("schedule=multistep needs --milestones (e.g. --milestones 30,60)")
    if cfg.is_self and (cfg.teacher_arch or cfg.student_arch):
        errors.append(f"mode {cfg.mode} trains one multi-exit network: use --arch, not "
                      "--teacher-arch/--student-arch")
    if cfg.mode == "base" and cfg.teacher_arch:
        errors.append("mode base trains one model: use --arch or --student-arch")
    if cfg.kd_loss == "paper-code" and cfg.is_self:
        errors.append("kd_loss=paper-code reproduces the online-KD objective; self KD has none")
    return errors


def official_setting_errors(cfg: Any) -> list[str]:
    """Messages for nonsensical combinations of the official-recipe settings (empty: fine)."""
    errors: list[str] = []
    if cfg.nesterov and (cfg.optimizer != "sgd" or cfg.momentum <= 0):
        errors.append("nesterov needs --optimizer sgd with a momentum above 0")
    if cfg.warmup_per == "epoch" and float(cfg.warmup_epochs) != int(cfg.warmup_epochs):
        errors.append(f"warmup_per=epoch needs a whole number of warmup_epochs, got "
                      f"{cfg.warmup_epochs}")
    factor = cfg.warmup_start_factor
    if factor is not None and not 0.0 <= factor <= 1.0:
        errors.append(f"warmup_start_factor must lie in [0, 1], got {factor}")
    if cfg.teacher_image_size is not None and cfg.teacher_image_size <= 0:
        errors.append(f"teacher_image_size must be greater than zero, got {cfg.teacher_image_size}")
    errors += _seed_errors(cfg.seeds)
    if cfg.finite_check_every > 1 and cfg.amp == "fp16":
        errors.append("finite_check_every > 1 cannot run with --amp fp16 (its GradScaler reads a "
                      "flag every step): use --amp bf16 or off, or --finite-check-every 1")
    if cfg.finite_check_every > 1 and cfg.mode in ("self", "spaced-self"):
        errors.append("finite_check_every > 1 needs fused optimisers, and torch's fused SGD with "
                      "momentum fails when some parameters first get gradients later, as self "
                      "KD's exits do: use --finite-check-every 1 for the self modes")
    if cfg.compat == "official-vit" and cfg.mode in ("self", "spaced-self"):
        errors.append("compat=official-vit is the vit code's preset; self KD's is compat=official")
    no_teacher = cfg.mode == "base" or cfg.mode in ("self", "spaced-self")
    for name in ("teacher_image_size", "shared_optimizer"):
        if no_teacher and getattr(cfg, name):
            errors.append(f"{name} needs a teacher; mode {cfg.mode} has none")
    if (cfg.mode == "frozen") != (cfg.teacher_checkpoint is not None):
        errors.append("mode frozen distils from a pretrained teacher: use --mode frozen with "
                      f"--teacher-checkpoint FILE (got mode {cfg.mode}, teacher_checkpoint "
                      f"{cfg.teacher_checkpoint})")
    if cfg.feature_kd == "inter":
        s, t = cfg.inter_student_blocks, cfg.inter_teacher_blocks
        if cfg.mode in ("self", "spaced-self"):
            errors.append("feature_kd=inter matches a student with a teacher; self KD has none")
        if not s or len(s) != len(t):
            errors.append(f"feature_kd=inter needs --inter-student-blocks and "
                          f"--inter-teacher-blocks of the same, non-zero length, got {s} and {t}")
        if any(i < 0 for i in (*s, *t)):
            errors.append(f"block indices must be 0 or more, got {s} and {t}")
    if cfg.teacher_features == "precomputed":
        errors += _precomputed_errors(cfg)
    return errors + graph_errors(cfg)


def _precomputed_errors(cfg: Any) -> list[str]:
    """Precomputed teacher maps are a frozen, pretrained teacher's block outputs, and nothing
    else: no teacher logits (the official code asserts OFFLINE and logit KD are not both on)."""
    errors = []
    if cfg.feature_kd != "inter":
        errors.append("teacher_features=precomputed is for --feature-kd inter")
    if cfg.mode != "frozen":
        errors.append(f"teacher_features=precomputed reads a pretrained teacher's maps: use "
                      f"--mode frozen with --teacher-checkpoint FILE (got mode {cfg.mode})")
    if cfg.alpha != 0:
        errors.append(f"teacher_features=precomputed has no teacher logits: use --alpha 0 (got "
                      f"{cfg.alpha})")
    return errors


def graph_errors(cfg: Any) -> list[str]:
    """What ``cuda_graphs: on`` cannot run with (captured steps read nothing on the host). A
    device named ``cpu`` is the one blocker said alone; ``auto`` is checked at run time."""
    if getattr(cfg, "cuda_graphs", "off") != "on":
        return []
    fix = "or --cuda-graphs off"
    if str(cfg.device).lower() == "cpu":
        return ["--cuda-graphs on needs a CUDA device (this run is on --device cpu): use "
                "--cuda-graphs off"]
    errors = []
    if cfg.finite_check_every <= 1:
        errors.append("--cuda-graphs on needs --finite-check-every N > 1 (a loss read on the host "
                      f"every step cannot be captured): e.g. --finite-check-every 16, {fix}")
    if cfg.trace:
        errors.append(f"--cuda-graphs on cannot write --trace (it reads every step): drop "
                      f"--trace, {fix}")
    if cfg.amp == "fp16":
        errors.append("--cuda-graphs on cannot run with --amp fp16 (its GradScaler reads a flag "
                      f"every step): use --amp bf16 or off, {fix}")
    if cfg.mode not in GRAPHED_MODES:
        errors.append(f"--cuda-graphs on supports modes {', '.join(GRAPHED_MODES)}, not "
                      f"{cfg.mode}: use one of them, {fix}")
    if cfg.teacher_features == "precomputed":
        errors.append("--cuda-graphs on cannot read precomputed teacher maps (each batch's are "
                      f"found on the host): {fix}")
    if cfg.compat == "official-vit" or cfg.replay == "fresh" or cfg.shared_optimizer:
        errors.append("--cuda-graphs on does not support --replay fresh or a shared optimiser "
                      f"yet (--compat official-vit has both): {fix}")
    return errors


def _seed_errors(seeds: str) -> list[str]:
    if not seeds:
        return []
    try:
        values = [int(v) for v in seeds.split(",")]
    except ValueError:
        return [f"seeds must be comma-separated whole numbers such as 0,1,2, got {seeds!r}"]
    if any(v < 0 for v in values) or len(set(values)) != len(values):
        return [f"seeds must be distinct numbers >= 0, got {seeds!r}"]
    return []


def parse_seeds(seeds: str) -> list[int]:
    """The seeds of ``--seeds`` (``"0,1,2"`` -> ``[0, 1, 2]``; empty -> ``[]``)."""
    return [int(v) for v in seeds.split(",")] if seeds else []
