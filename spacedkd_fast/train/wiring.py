"""What the configuration passes to the engine: its official switches, the objective, the
frozen teacher's weights, the model wrappers of the official ViT recipes and the precomputed
teacher maps (``--teacher-features precomputed``).

The engine's presets (``compat=``) decide every switch the user left open: a switch is passed only
when the configuration sets it explicitly (``TrainConfig.explicit``), else ``None``. The values the
engine then runs with are written back into the configuration, so that ``config.yaml`` (and a
resume, which treats every saved key as explicit) records what ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.feature_cache import MapsSource
from ..engine.compat import OBJECTIVE_FORMS, resolve_switches
from ..engine.model_io import unwrap
from ..models import BlockFeatures
from ..ops.objective import KDObjective
from .config import TrainConfig
from .errors import UserError

PAIR_SWITCHES = ("teacher_bn_update", "flush_tail", "replay", "offline_student_data",
                 "zero_interval", "shared_optimizer", "kd_second_forward", "frozen_teacher_mode")
SELF_SWITCHES = ("self_kd_first_replay", "flush_tail", "self_kd_feature_exits",
                 "self_kd_trigger_step", "self_kd_trigger_forward")


def family(cfg: TrainConfig) -> str:
    return "self" if cfg.is_self else "pair"


def compat_of(cfg: TrainConfig) -> str | None:
    """The engine's ``compat=``: ``None`` for ``none`` and for a base run (no KD to switch on)."""
    return None if cfg.compat == "none" or cfg.mode == "base" else cfg.compat


def given_switches(cfg: TrainConfig) -> dict[str, Any]:
    """The switches the user set (the value), the others ``None`` (the preset decides)."""
    names = SELF_SWITCHES if cfg.is_self else PAIR_SWITCHES
    return {n: getattr(cfg, n) if n in cfg.explicit else None for n in names}


def resolved_switches(cfg: TrainConfig) -> dict[str, Any]:
    """Every switch as the engine will run it (its own resolution); ``UserError`` on a switch
    that contradicts the preset."""
    try:
        return resolve_switches(compat_of(cfg), family(cfg), given_switches(cfg))
    except ValueError as err:
        text = str(err).replace("use compat=None", "use --compat none")
        raise UserError(f"--compat {cfg.compat}: {text}") from None


def objective_args(cfg: TrainConfig) -> dict[str, Any]:
    """``loss=`` (no preset) or ``temperature=`` / ``alpha=`` / ``kd_scale=`` (under a preset,
    which builds the objective in its own form) for the distiller."""
    kind = "paper-code" if cfg.kd_loss == "paper-code" else "kl"
    compat = compat_of(cfg)
    if compat is None:
        kd_scale = cfg.kd_scale
        if cfg.is_self and kd_scale is None:
            kd_scale = cfg.temperature ** 2
        return {"loss": KDObjective(temperature=cfg.temperature, alpha=cfg.alpha, kd_scale=kd_scale,
                                    kind=kind, normalization=cfg.kd_normalization)}
    form = OBJECTIVE_FORMS.get((family(cfg), compat), {})
    for name, value, flag in (("kind", kind, "kd_loss"),
                              ("normalization", cfg.kd_normalization, "kd_normalization")):
        if flag in cfg.explicit and name in form and form[name] != value:
            raise UserError(f"--compat {cfg.compat} trains the objective {name}={form[name]!r}; "
                            f"drop --{flag.replace('_', '-')} {getattr(cfg, flag)} or use "
                            "--compat none")
    kd_scale = cfg.kd_scale if "kd_scale" in cfg.explicit else None
    return {"temperature": cfg.temperature, "alpha": cfg.alpha, "kd_scale": kd_scale}


def record_resolved(cfg: TrainConfig, switches: dict[str, Any], objective: Any) -> None:
    """Write what the engine runs with into ``cfg`` (see the module docstring)."""
    if compat_of(cfg) is None:
        return
    for name, value in switches.items():
        setattr(cfg, name, value)
    if isinstance(objective, KDObjective):
        cfg.kd_loss = "paper-code" if objective.kind == "paper-code" else "fused"
        cfg.kd_normalization = objective.normalization
        if objective.kind == "kl" and objective.kd_scale is not None:
            cfg.kd_scale = float(objective.kd_scale)  # the preset's form (self official: 1)


# ------------------------------------------------------------------ the frozen teacher
def teacher_state(path: str) -> tuple[dict[str, Tensor], str | None]:
    """The weights in a run's ``best_student.pt`` (its student) or ``checkpoint.pt`` (its
    student), and the architecture the file names (``None`` when it names none)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--teacher-checkpoint {path}: no such file (give a run's best_student.pt "
                        "or checkpoint.pt)")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged file makes the unpickler raise anything
        from .checkpoint import what_the_file_is  # the bytes say what it is, not the exception

        raise UserError(f"--teacher-checkpoint {path} {what_the_file_is(file)}") from None
    arch = None
    if isinstance(payload, dict) and isinstance(payload.get("models"), dict):  # checkpoint.pt
        config = payload.get("config") or {}
        arch = config.get("student_arch") or config.get("arch")
        payload = payload["models"].get("student")
    elif isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        arch = payload.get("arch")
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise UserError(f"--teacher-checkpoint {path}: not a run's best_student.pt or "
                        "checkpoint.pt (no student weights in it)")
    return payload, arch


def load_teacher(teacher: nn.Module, cfg: TrainConfig) -> None:
    """Load ``cfg.teacher_checkpoint`` into ``teacher`` (strict) and freeze it."""
    state, arch = teacher_state(cfg.teacher_checkpoint)
    try:
        unwrap(teacher).load_state_dict(state)
    except RuntimeError as err:
        named = f" (the file holds a {arch})" if arch else ""
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"--teacher-checkpoint {cfg.teacher_checkpoint} does not fit teacher "
                        f"architecture {cfg.teacher!r}{named}: {first}; set --teacher-arch (and "
                        "--teacher-kwargs) to the run's student") from None
    for p in teacher.parameters():
        p.requires_grad_(False)


# ------------------------------------------------------------------ model wrappers
class ResizedInput(nn.Module):
    """``model`` fed each batch resized to ``size`` px (bilinear, ``align_corners=False``, no
    antialias: ``OFFICIAL_VIT_FACTS.md`` section 4.2, a 32 px ResNet-56 teacher under 224 px
    students). ``distill_logits`` and ``block_taps`` are the wrapped model's."""

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        self.model, self.size = model, int(size)

    def forward(self, x: Tensor):
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=False)
        return self.model(x)

    @property
    def distill_logits(self):
        return getattr(self.model, "distill_logits", None)

    def block_taps(self):
        return unwrap(self.model).block_taps()


class InterFeatures(nn.Module):
    """``model`` returning ``(maps, logits)``: ``maps`` the outputs of blocks ``indices`` (in
    that order, ``[B, C, h, w]``), the pairs of ``--feature-kd inter``."""

    def __init__(self, model: nn.Module, indices: list[int], role: str) -> None:
        super().__init__()
        self.model, self.indices = model, list(indices)
        try:
            self.recorder = BlockFeatures(model, indices=self.indices)
        except TypeError as err:
            raise UserError(f"--feature-kd inter: the {role} has no per-block features ({err})"
                            ) from None
        except (IndexError, ValueError) as err:
            raise UserError(f"--feature-kd inter: {role} blocks {self.indices}: {err}") from None

    def forward(self, x: Tensor):
        out = self.model(x)
        logits = out[1] if isinstance(out, tuple) else out
        return list(self.recorder.features), logits

    @property
    def distill_logits(self):
        return getattr(self.model, "distill_logits", None)


# ------------------------------------------------------------------ precomputed teacher maps
def precomputed_source(cfg: TrainConfig, data: Any, source: Any, teacher: nn.Module, *,
                       world_size: int = 1) -> MapsSource:
    """``source`` with the frozen teacher's cached maps of each batch, cropped and flipped like
    its images (the cache is built first when missing: ``cache_features``)."""
    from .cache_features import keyed_source, open_cache

    keyed = keyed_source(data)
    cache = open_cache(cfg, data, teacher, world_size=world_size)
    return MapsSource(source, keyed, cache)


class PrecomputedTeacher(nn.Module):
    """What the engine calls the teacher under ``--teacher-features precomputed``: it returns
    ``(maps, logits)`` like :class:`InterFeatures`, with ``maps`` the batch's cached teacher
    maps (``MapsSource.maps_for``) and no teacher forward at all. The loaded teacher is kept
    (never run: the official OFFLINE code builds and loads it too) so that the engine finds the
    teacher's device and mode where it looks. There are no teacher logits: ``logits`` are zeros
    that the objective weighs with ``alpha = 0`` (config_checks requires it)."""

    def __init__(self, teacher: nn.Module, source: MapsSource, num_classes: int) -> None:
        super().__init__()
        self.model, self.num_classes = teacher, int(num_classes)
        self.source = source  # not a module: no state of its own

    def forward(self, x: Tensor):
        maps = self.source.maps_for(x)
        return maps, x.new_zeros(x.shape[0], self.num_classes, dtype=torch.float32)

    @property
    def distill_logits(self):
        return None


def inter_teacher(cfg: TrainConfig, teacher: nn.Module, source: Any, num_classes: int
                  ) -> nn.Module:
    """The teacher the engine reads under ``--feature-kd inter``: the cached maps of each batch
    (a :class:`MapsSource`), else the teacher's own block outputs."""
    if isinstance(source, MapsSource):
        return PrecomputedTeacher(teacher, source, num_classes)
    return InterFeatures(teacher, cfg.inter_teacher_blocks, "teacher")
