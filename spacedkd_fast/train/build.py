"""Everything a run trains with, built in one place: ``build_run(cfg, info) -> RunParts``.

The order of construction is part of the result: the seeds are set first, then the data, then the
teacher and the student under the run's seed (teacher first), so the same configuration always
starts from the same weights. Nothing here trains or writes files.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import build_data
from ..data.datasets import cifar_present
from ..engine.distill import SelfDistiller, SpacedDistiller
from ..engine.model_io import unwrap
from ..model_catalog import multi_exit_name
from ..models import apply_bn_groups, create
from .config import TrainConfig
from .distributed import DistInfo, average_gradients_of, wrap_ddp
from .errors import UserError
from .lr_schedule import EpochSchedule, StepSchedule, build_schedule
from .optim import build_optimizer
from .speed_defaults import apply_speed_defaults, channels_last_on
from .wiring import (
    InterFeatures,
    ResizedInput,
    compat_of,
    given_switches,
    inter_teacher,
    load_teacher,
    objective_args,
    precomputed_source,
    record_resolved,
    resolved_switches,
)

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # "auto": resolved first
OVERLAP = {"auto": "auto", "on": True, "off": False}


@dataclass
class RunParts:
    """The objects one run trains with (``teacher`` and its optimiser are ``None`` without one)."""

    cfg: TrainConfig
    info: DistInfo
    data: Any  # a DataBundle: .train (keyed source), .test(), .name, .num_classes, .image_size
    source: Any  # the replayable training source the loop and the engine read
    steps_per_epoch: int
    teacher: nn.Module | None
    student: nn.Module
    teacher_opt: torch.optim.Optimizer | None
    student_opt: torch.optim.Optimizer
    teacher_sched: StepSchedule | EpochSchedule | None
    student_sched: StepSchedule | EpochSchedule
    scaler: Any  # torch.amp.GradScaler under fp16, else None
    distiller: Any  # SpacedDistiller or SelfDistiller
    amp_dtype: torch.dtype | None

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def student_arch(self) -> str:
        """The architecture name of the student (self KD: the multi-exit network)."""
        return self_arch(self.cfg.arch) if self.cfg.is_self else self.cfg.student

    def lr(self) -> float:
        """The learning rate shown in logs: the teacher's when there is one."""
        return float((self.teacher_opt or self.student_opt).param_groups[0]["lr"])

    def num_train_samples(self) -> int:
        n = getattr(self.source, "num_samples", None)
        return int(n) if n is not None else self.steps_per_epoch * self.cfg.batch_size


def self_arch(name: str) -> str:
    """Self KD trains a multi-exit network: ``resnet18`` means ``byot_resnet18``."""
    return multi_exit_name(name)


def resolve_dataset(cfg: TrainConfig) -> str:
    """The data set the run will use (``None`` -> cifar100 when on disk, else digits)."""
    if cfg.dataset:
        return cfg.dataset
    return "cifar100" if cifar_present(cfg.data_dir, 100) else "digits"


def seed_everything(cfg: TrainConfig, device: torch.device) -> None:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _build_data(cfg: TrainConfig, info: DistInfo):
    try:
        # --download: a missing CIFAR-10/100 is fetched through torchvision's CIFAR classes,
        # which verify the archive's MD5 checksum; offline, the error says the download failed
        return build_data(cfg.dataset, data_dir=cfg.data_dir, recipe=cfg.augment,
                          batch_size=cfg.batch_size, seed=cfg.seed, device=str(info.device),
                          backend=cfg.data_backend, rank=info.rank,
                          world_size=info.world_size, image_size=cfg.image_size,
                          download=cfg.download, drop_last=cfg.drop_last)
    except FileNotFoundError as err:
        raise UserError(str(err)) from None
    except (ValueError, ImportError) as err:
        raise UserError(f"data: {err}") from None


def _build_model(cfg: TrainConfig, data: Any, name: str, extra: dict[str, Any],
                 device: torch.device, image_size: int | None = None) -> nn.Module:
    try:
        model = create(name, data.num_classes, image_size or data.image_size,
                       **{**cfg.model_kwargs, **extra})
    except (ValueError, TypeError) as err:
        raise UserError(f"model {name!r}: {err}") from None
    model = model.to(device)
    if channels_last_on(cfg.channels_last):
        model = model.to(memory_format=torch.channels_last)
    return model


def _build_distiller(cfg: TrainConfig, info: DistInfo, common: dict[str, Any], teacher, student,
                     teacher_opt, student_opt, teacher_sched, student_sched,
                     switches: dict[str, Any], num_classes: int):
    """The engine's distiller: the switches the user set (the preset decides the others)."""
    given = given_switches(cfg)
    try:
        objective = objective_args(cfg)
        if cfg.is_self:
            distiller = SelfDistiller(
                student, student_opt, mode=cfg.mode, interval_rate=cfg.interval_rate,
                beta=cfg.beta, compat=compat_of(cfg), scheduler=student_sched,
                **objective, **given, **common)
            record_resolved(cfg, switches, distiller.objective)
            return distiller
        if cfg.mode == "base":
            objective, given = {}, {}
        if cfg.feature_kd == "inter":  # the engine reads (list of paired maps, logits)
            teacher = inter_teacher(cfg, teacher, common["source"], num_classes)
            student = InterFeatures(student, cfg.inter_student_blocks, "student")
        distiller = SpacedDistiller(
            teacher, student, teacher_opt, student_opt, mode=cfg.mode,
            interval_rate=cfg.interval_rate, beta=cfg.beta, feature_loss=cfg.feature_loss,
            feature_kd=cfg.feature_kd, compat=compat_of(cfg), overlap=OVERLAP[cfg.overlap],
            teacher_scheduler=teacher_sched, student_scheduler=student_sched,
            projector_seed=cfg.seed, cuda_graphs=cfg.cuda_graphs == "on", **objective, **given,
            **common)
        record_resolved(cfg, switches, distiller.kd)
        return distiller
    except (NotImplementedError, ValueError) as err:
        raise UserError(str(err)) from None


def _build_optimizers(cfg: TrainConfig, teacher, student, shared: bool):
    """``(teacher_opt, student_opt)``: one optimiser over both networks under
    ``shared_optimizer`` (the official ViT code's), none for a frozen teacher."""
    fused = cfg.finite_check_every > 1  # deferred checks skip steps through fused kernels
    # cuda_graphs: tensor rates that a captured step reads (the call is unchanged when off)
    graphs = {"graphs": True} if cfg.cuda_graphs == "on" and not cfg.is_self else {}
    try:
        if teacher is not None and shared and cfg.mode != "frozen":
            opt = build_optimizer(cfg, [unwrap(teacher), unwrap(student)], fused=fused)
            return opt, opt
        teacher_opt = (build_optimizer(cfg, teacher, fused=fused, **graphs)
                       if teacher is not None and cfg.mode != "frozen" else None)
        return teacher_opt, build_optimizer(cfg, student, fused=fused, **graphs)
    except (ValueError, RuntimeError) as err:
        raise UserError(str(err)) from None


def build_run(cfg: TrainConfig, info: DistInfo, *, data: Any = None) -> RunParts:
    """Seeds, data (``data``: a prebuilt bundle, as tests inject, or a callable ``(cfg, info) ->
    bundle``, as :func:`spacedkd_fast.train.run` passes), models, optimisers, LR
    schedules, gradient scaler and the distiller of ``cfg``, on ``info.device``.

    ``amp`` / ``channels_last`` auto are resolved for the device first and written back into
    ``cfg`` (speed_defaults.py): what the run trains with is what config.yaml records."""
    apply_speed_defaults(cfg, info.device.type)
    seed_everything(cfg, info.device)
    if data is None:
        data = _build_data(cfg, info)
    elif callable(data):  # user_data.UserSets: built here, where the device and rank are known
        data = data(cfg, info)
    source = data.train
    if channels_last_on(cfg.channels_last):
        source = ChannelsLastSource(source)
    steps = int(source.steps_per_epoch)
    # models under the run's seed: teacher first, then student (fixed order = fixed weights)
    torch.manual_seed(cfg.seed)
    teacher = None
    if cfg.is_self:
        student = _build_model(cfg, data, self_arch(cfg.arch), cfg.student_kwargs, info.device)
    else:
        if cfg.mode != "base":
            teacher = _build_model(cfg, data, cfg.teacher, cfg.teacher_kwargs, info.device,
                                   image_size=cfg.teacher_image_size)
        student = _build_model(cfg, data, cfg.student, cfg.student_kwargs, info.device)
    if cfg.mode == "frozen":
        load_teacher(teacher, cfg)
    if cfg.teacher_features == "precomputed":  # cached maps instead of a teacher forward
        source = precomputed_source(cfg, data, source, teacher, world_size=info.world_size)
    for m in (teacher, student):
        if m is not None and cfg.bn_groups != 1:
            apply_bn_groups(m, cfg.bn_groups)
    if cfg.compile:
        for m in (teacher, student):
            if m is not None:
                m.compile()
    if teacher is not None and cfg.mode != "frozen":
        teacher = wrap_ddp(teacher, info)
    if teacher is not None and cfg.teacher_image_size is not None:
        teacher = ResizedInput(teacher, cfg.teacher_image_size)
    student = wrap_ddp(student, info)

    switches = resolved_switches(cfg)
    teacher_opt, student_opt = _build_optimizers(cfg, teacher, student,
                                                 bool(switches.get("shared_optimizer")))
    student_sched = build_schedule(student_opt, cfg, steps)
    teacher_sched = None
    if teacher_opt is not None:  # one schedule for one shared optimiser
        teacher_sched = (student_sched if teacher_opt is student_opt
                         else build_schedule(teacher_opt, cfg, steps))
    scaler = torch.amp.GradScaler(info.device.type) if cfg.amp == "fp16" else None
    amp_dtype = AMP_DTYPES[cfg.amp]
    trace = cfg.trace
    if trace and info.rank > 0:
        trace = f"{trace}.rank{info.rank}"
    common = dict(steps_per_epoch=steps, trace=trace, source=source,
                  amp_dtype=amp_dtype, grad_scaler=scaler, check_finite=True,
                  check_finite_every=cfg.finite_check_every)
    distiller = _build_distiller(cfg, info, common, teacher, student, teacher_opt, student_opt,
                                 teacher_sched, student_sched, switches, data.num_classes)
    projector = getattr(distiller, "projector", None)
    if projector is not None:
        average_gradients_of(projector, info)
    return RunParts(cfg=cfg, info=info, data=data, source=source, steps_per_epoch=steps,
                    teacher=teacher, student=student, teacher_opt=teacher_opt,
                    student_opt=student_opt, teacher_sched=teacher_sched,
                    student_sched=student_sched, scaler=scaler, distiller=distiller,
                    amp_dtype=amp_dtype)


def n_params(model: nn.Module) -> str:
    n = sum(p.numel() for p in unwrap(model).parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


class ChannelsLastSource:
    """A replayable source whose batches come out in channels_last memory format."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps_per_epoch = inner.steps_per_epoch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @staticmethod
    def _cl(batch):
        x, y = batch
        return x.contiguous(memory_format=torch.channels_last), y

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Any]]:
        for key, batch in self.inner.epoch(epoch, start=start):
            yield key, self._cl(batch)

    def batch(self, key: int):
        return self._cl(self.inner.batch(key))

    def batches(self, keys) -> Iterator[Any]:
        """A replay's run of batches, loaded ahead by the inner source when it can (a
        KeyedLoader's workers), channels_last."""
        if getattr(type(self.inner), "batches", None) is None:
            return (self.batch(k) for k in keys)
        return (self._cl(b) for b in self.inner.batches(keys))

    def stream(self, s: int) -> ChannelsLastSource:
        """The inner source's stream ``s`` (the second stream of ``replay=fresh``), channels_last."""
        return ChannelsLastSource(self.inner.stream(s))
