"""SpacedDistiller: two-model KD in the modes ``base``, ``online``, ``spaced``, ``offline``.

Rules (SPEC sections 3 and 4) and where they live: *when* the student replays,
:mod:`.spacing`; *what* is replayed, :mod:`.replay` (every replayed batch of a keyed source is
checked against the checksum of the teacher step that recorded it); the step and replay machinery,
:mod:`.base`; *overlap*, :mod:`.overlap` (CUDA only; the CPU runs the sequential order).

Teacher snapshot and BatchNorm: soft targets come from the teacher as it stands when the replay
fires, in train mode (batch statistics) with its running statistics and ``num_batches_tracked``
untouched (BN layers briefly stop tracking) unless ``teacher_bn_update=True``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import graphed_steps
from .base import EngineBase, LossFn
from .compat import check_compat, resolve_objective, resolve_switches
from .feature_kd import build_head, check_feature_kd, detached_to, feature_term, head_dims
from .model_io import (
    ce_logits,
    fp32,
    frozen_bn_stats,
    in_mode,
    kd_logits,
    model_device,
    norm_device,
    split_output,
    target_logits,
    to_device,
    tracking_bns,
    train_mode,
    unwrap,
    with_distill_head,
)
from .options import REPLAY_KINDS, STUDENT_DATA
from .overlap import Lanes, overlap_wanted
from .replay import Record
from .spaced_replays import SpacedReplays
from .trace import batch_checksum


class SpacedDistiller(SpacedReplays, EngineBase):
    """Two-model KD: ``base``, ``online``, ``spaced``, ``offline`` (SPEC section 3).

    Usage::

        d = SpacedDistiller(teacher, student, teacher_opt, student_opt, mode="spaced",
                            interval_rate=1.5, steps_per_epoch=L, loss=KDObjective(3.0, 0.3, 1.0))
        for key, (x, y) in source:      # x: [B, ...], y: [B] class indices
            d.step(key, x, y)
        d.finish()

    Models return logits ``[B, C]`` or ``(features [B, D], logits [B, C])``; with features on both
    sides and ``beta > 0`` the student gets a projection head (``.projector``, added to
    ``student_opt`` as a new param group) and the loss ``beta * feature_loss(g(f_s), f_t)``;
    ``feature_kd="inter"``: models return ``(list of paired maps [B, C, h, w], logits)`` and the
    head is the official intermediate-feature KD (1x1 adapters, resize, MSE; :mod:`.feature_kd`).
    ``loss`` is a :class:`~spacedkd_fast.ops.objective.KDObjective` (default: ``KDObjective()``,
    the package's one default; ``kind="paper-code"`` is the official objective), a ``KDLoss`` or
    any function ``(student_logits, teacher_logits, y) -> scalar``. ``base`` trains the student
    alone with CE (``teacher`` and ``teacher_opt`` may be ``None``). With ``source=None`` batches
    are kept as copies (``CopyReplay(copy_device, copy_dtype)``); with a :class:`ReplayableSource`
    only keys are kept and each replayed batch is verified against the recorded checksum.

    ``frozen``: a pretrained teacher that never trains (``teacher_opt=None``) gives soft targets
    on every batch (eval mode; ``frozen_teacher_mode="train"`` as in the official ViT code).

    ``compat`` turns on every behaviour of an official code base (:mod:`.compat`); each one is
    also a keyword of its own, whose ``None`` means "ours, or the preset's":

    =========================  ==================  =======================================
    keyword                    ours                ``"official"`` (online_KD) / ``"official-vit"``
    =========================  ==================  =======================================
    objective                  ``KDObjective()``   ``kind="paper-code"`` / ``normalization="class"``
    ``teacher_bn_update``      False               True / True
    ``flush_tail``             True                False / False
    ``offline_student_data``   ``"replay"``        ``"fresh"`` / ``"fresh"``
    ``zero_interval``          ``"error"``         ``"online"`` / -
    ``replay``                 ``"keyed"``         - / ``"fresh"`` (needs ``source.stream(1)``)
    ``shared_optimizer``       False               - / True (``teacher_opt is student_opt``)
    ``kd_second_forward``      False               - / True
    ``frozen_teacher_mode``    ``"eval"``          - / ``"train"``
    =========================  ==================  =======================================

    Under a preset the objective is built from ``temperature`` / ``alpha``; a ``loss=`` of
    another form, or a keyword that contradicts the preset, is a ``ValueError``.

    Resuming: call ``load_state_dict`` on a fresh distiller before loading ``student_opt``'s state
    (the projector's param group must exist first).

    ``check_finite``: a non-finite loss is a ``NonFiniteLossError`` and never an update; each loss
    is read on the host before its step, or with ``check_finite_every=N > 1`` checked on the device
    and read every N updates (fused optimizers needed; :mod:`.deferred_checks`).

    ``cuda_graphs=True``: the hot steps are captured as CUDA graphs and replayed (preconditions and
    what stays on the host: :mod:`.graphed_steps`; tests pass a ``graphs.RecordingBackend``).
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module,
                 teacher_opt: torch.optim.Optimizer | None, student_opt: torch.optim.Optimizer, *,
                 mode: str = "spaced", interval_rate: float = 1.5, steps_per_epoch: int,
                 loss: Callable[..., Tensor] | None = None, temperature: float | None = None,
                 alpha: float | None = None, kd_scale: float | None = None, beta: float = 0.0,
                 feature_loss: str | Callable[[Tensor, Tensor], Tensor] = "dist",
                 feature_kd: str = "penultimate",
                 compat: str | None = None, flush_tail: bool | None = None,
                 teacher_bn_update: bool | None = None, replay: str | None = None,
                 offline_student_data: str | None = None, zero_interval: str | None = None,
                 shared_optimizer: bool | None = None, kd_second_forward: bool | None = None,
                 frozen_teacher_mode: str | None = None,
                 trace: str | os.PathLike | None = None, source: Any = None,
                 overlap: bool | str = "auto", teacher_device: torch.device | str | None = None,
                 student_device: torch.device | str | None = None, teacher_scheduler: Any = None,
                 student_scheduler: Any = None, amp_dtype: torch.dtype | None = None,
                 grad_scaler: Any = None, check_finite: bool = True, check_finite_every: int = 1,
                 on_student_epoch_end: Callable[[int], None] | None = None,
                 copy_device: torch.device | str | None = None,
                 copy_dtype: torch.dtype | None = None, projector_seed: int = 0,
                 cuda_graphs: Any = False) -> None:
        check_compat(compat, "pair")
        sw = resolve_switches(compat, "pair", {
            "flush_tail": flush_tail, "teacher_bn_update": teacher_bn_update, "replay": replay,
            "offline_student_data": offline_student_data, "zero_interval": zero_interval,
            "shared_optimizer": shared_optimizer, "kd_second_forward": kd_second_forward,
            "frozen_teacher_mode": frozen_teacher_mode})
        for name, allowed in (("replay", REPLAY_KINDS), ("offline_student_data", STUDENT_DATA)):
            if sw[name] not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {sw[name]!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.compat, self.replay = compat, sw["replay"]
        self.offline_student_data = sw["offline_student_data"]
        super().__init__(mode=mode, interval_rate=interval_rate, self_kd=False,
                         steps_per_epoch=steps_per_epoch, trace=trace, source=source,
                         check_finite=check_finite, amp_dtype=amp_dtype, grad_scaler=grad_scaler,
                         flush_tail=sw["flush_tail"], on_student_epoch_end=on_student_epoch_end,
                         copy_device=copy_device, copy_dtype=copy_dtype,
                         first_replay="vit" if self.replay == "fresh" else "interval",
                         zero_interval=sw["zero_interval"], check_finite_every=check_finite_every)
        if self.spec.teacher and teacher is None:
            raise ValueError(f"mode {self.mode!r} needs a teacher")
        if self.spec.teacher and not self.spec.frozen_teacher and teacher_opt is None:
            raise ValueError(f"mode {self.mode!r} needs a teacher and a teacher optimizer")
        needs_stream = self.replay == "fresh" and self.spec.replays == "interval"
        if needs_stream and not callable(getattr(source, "stream", None)):
            raise ValueError("replay='fresh' needs a source with a second stream "
                             "(source.stream(1): the same data, independently shuffled and "
                             "augmented), e.g. spacedkd_fast.data.InMemorySource; use "
                             "replay='keyed' otherwise")
        if self.mode == "offline" and self.offline_student_data == "fresh" and source is None:
            raise ValueError("offline_student_data='fresh' trains the student on new passes of "
                             "the source: pass source=... (a replayable source), or use "
                             "offline_student_data='replay'")
        # a frozen teacher has nothing to share an optimizer with (the official frozen teacher's
        # parameters have requires_grad=False, which AdamW skips)
        self.shared_optimizer = bool(sw["shared_optimizer"]) and not self.spec.frozen_teacher
        self.frozen_teacher_mode = sw["frozen_teacher_mode"]
        if self.frozen_teacher_mode not in ("eval", "train"):
            raise ValueError("frozen_teacher_mode must be 'eval' or 'train', got "
                             f"{self.frozen_teacher_mode!r}")
        if self.shared_optimizer and (teacher_opt is None or teacher_opt is not student_opt):
            raise ValueError("shared_optimizer=True needs one optimizer over both networks, "
                             "passed as teacher_opt and student_opt (the same object)")
        self.kd_second_forward = bool(sw["kd_second_forward"])
        self.teacher, self.student = teacher, student
        self.teacher_opt, self.student_opt = teacher_opt, student_opt
        self._check_deferred_optimizers(teacher_opt if self.spec.teacher else None, student_opt)
        self.teacher_scheduler, self.student_scheduler = teacher_scheduler, student_scheduler
        self.teacher_bn_update = bool(sw["teacher_bn_update"])
        self.beta = float(beta)
        self.projector_seed = int(projector_seed)

        self.student_device = (norm_device(student_device) if student_device is not None
                               else model_device(student))
        if student_device is not None:
            student.to(self.student_device)
        self.teacher_device = self.student_device
        if teacher is not None:
            self.teacher_device = (norm_device(teacher_device) if teacher_device is not None
                                   else model_device(teacher))
            if teacher_device is not None:
                teacher.to(self.teacher_device)

        self.kd = (resolve_objective(loss, temperature, alpha, kd_scale, compat=compat,
                                     family="pair", any_callable=True)
                   if self.spec.teacher else None)
        self._fresh_passes_done = 0  # replay='fresh': passes begun over the second stream
        if self.shared_optimizer and self.mode == "online" and not hasattr(self.kd, "alpha"):
            raise ValueError("shared_optimizer=True in online mode trains (1 - alpha) (CE_s + CE_t)"
                             " + alpha KD in one step: pass loss=KDObjective(...) (or "
                             "temperature=/alpha=) so that alpha is known")
        self.feature_loss = check_feature_kd(feature_kd, feature_loss)
        self.feature_kd = feature_kd
        self.projector: nn.Module | None = None  # the feature head (see feature_kd.py)
        self._projector_dims: tuple | None = None
        if self.beta > 0 and self.spec.teacher and feature_kd == "penultimate":
            s_dim = getattr(unwrap(student), "feature_dim", None)
            t_dim = getattr(unwrap(teacher), "feature_dim", None)
            if s_dim is not None and t_dim is not None:
                self._make_projector(int(s_dim), int(t_dim))

        self.overlap = self._want_overlap(overlap)
        self._snapshot: nn.Module | None = None
        self._lanes = Lanes(self.teacher_device, self.student_device, self.overlap)
        self._bn_cache: dict[int, list[_BatchNorm]] = {}
        self._queue: list[Record] = []  # overlap: student work of the last interval, not issued
        self._queue_teacher_step = 0
        self._queue_count = 0
        self._graphs = graphed_steps.make_step_graphs(self, cuda_graphs)

    # -- construction helpers ---------------------------------------------------------------
    def _want_overlap(self, overlap) -> bool:
        return overlap_wanted(self, overlap)

    def _make_projector(self, s_dims, t_dims) -> None:
        head = build_head(self.feature_kd, (s_dims, t_dims), self.projector_seed)
        p = next(iter(self.student.parameters()), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else None
        self.projector = head.to(device=self.student_device, dtype=dtype)
        self._projector_dims = (s_dims, t_dims)
        self.student_opt.add_param_group({"params": list(self.projector.parameters())})

    # -- batch steps (the mode table's ``step`` values) -------------------------------------
    def _batch_steps(self):
        return {"student": self._base_step, "online": self._online_step,
                "record": self._record_step, "frozen": self._frozen_step}

    def _teacher_forward_train(self, x: Tensor) -> tuple[Tensor | None, Any]:
        train_mode(self.teacher)
        with self._autocast(self.teacher_device):
            return split_output(self.teacher(x))

    def _record_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        x = to_device(x, self.teacher_device)
        y = to_device(y, self.teacher_device)

        def ce_loss(x: Tensor = x, y: Tensor = y) -> Tensor:  # cuda_graphs: static copies
            _, z = self._teacher_forward_train(x)
            return F.cross_entropy(fp32(ce_logits(z)), y)

        self._recorded_ce_step(self.teacher, ce_loss, key, x, y, self.teacher_opt,
                               self.teacher_scheduler, "", record=self.replay == "keyed",
                               idle=self._idle(self.student, self.projector))
        if self._queue:  # overlap: one student step of the previous interval per teacher step
            self._issue_queued(1)

    def _base_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        x = to_device(x, self.student_device)
        y = to_device(y, self.student_device)

        def ce(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            train_mode(self.student)
            with self._autocast(self.student_device):
                _, z = split_output(self.student(x))
            return F.cross_entropy(fp32(ce_logits(z)), y), {}

        self._student_step(key, x, y, loss_fn=ce, guard=(self.student,), teacher_step=None)

    def _frozen_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        x = to_device(x, self.student_device)
        y = to_device(y, self.student_device)
        with in_mode(self.teacher, self.frozen_teacher_mode == "train") as teacher:
            self._student_step(key, x, y, loss_fn=self._replay_loss(teacher),
                               guard=self._replay_guard(teacher), teacher_step=None)

    def _online_losses(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        xt = to_device(x, self.teacher_device)
        t_feat, t_z = self._teacher_forward_train(xt)
        t_loss = F.cross_entropy(fp32(ce_logits(t_z)), to_device(y, self.teacher_device))
        target = to_device(target_logits(t_z).detach(), self.student_device)
        feat = detached_to(t_feat, self.student_device)
        s_loss, parts = self._student_loss(to_device(x, self.student_device),
                                           to_device(y, self.student_device), target, feat)
        return t_loss, s_loss, parts

    def _online_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        if self._graphs is not None:
            graphed_steps.online_step(self, key, x, y)  # captured; warm-up: the eager step
        else:
            self._eager_online_step(key, x, y)

    def _eager_online_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        xt = to_device(x, self.teacher_device)
        yt = to_device(y, self.teacher_device)
        # both losses are checked before either model is updated: a refused step writes nothing
        with self._guard(self.teacher, self.student):
            t_loss, s_loss, parts = self._online_losses(x, y)
            checksum = batch_checksum(xt, yt) if self.trace is not None else None
            cs = self._check_step([(t_loss, "teacher", self.teacher_steps + 1),
                                   (s_loss, "student", self.student_steps + 1)], key, "",
                                  checksum)
        if self.shared_optimizer:  # official ViT: (1 - a) (CE_s + CE_t) + a KD, one step
            self._backward_step(s_loss + (1 - self.kd.alpha) * t_loss, self.student_opt,
                                self.student_scheduler)
        else:
            self._backward_step(t_loss, self.teacher_opt, self.teacher_scheduler)
        self.teacher_steps += 1
        self._stats.add("teacher_loss", t_loss)
        self._write("teacher_step", n=self.teacher_steps, epoch=(self.n - 1) // self.steps_per_epoch,
                    key=self._key_json(key), checksum=cs)
        if not self.shared_optimizer:
            self._backward_step(s_loss, self.student_opt, self.student_scheduler)
        self._student_done_one(key, self.teacher_steps - 1, cs, s_loss, parts)

    # -- the student's KD loss --------------------------------------------------------------
    def _student_loss(self, x: Tensor, y: Tensor, t_logits: Tensor, t_feat: Tensor | None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        train_mode(self.student)
        with self._autocast(self.student_device):
            s_feat, s_z = split_output(self.student(x))
            s_z = with_distill_head(self.student, s_z)
            if self.kd_second_forward and isinstance(s_z, Tensor):
                # official ViT: a student without a distillation head gets its KD logits (and
                # the features it compares) from a second forward (new drop-path draws); CE
                # stays on the first
                s_feat, z_kd = split_output(self.student(x))
                s_z = (s_z, z_kd)
        if kd_logits(s_z).shape != t_logits.shape:
            raise ValueError(
                f"student and teacher logits must have the same shape [B, C]; got student "
                f"{tuple(kd_logits(s_z).shape)} and teacher {tuple(t_logits.shape)}")
        loss, kd_parts = self.kd(s_z, t_logits, y)
        parts = dict(kd_parts)
        if self.beta > 0 and s_feat is not None and t_feat is not None:
            if self.projector is None:
                self._make_projector(*head_dims(self.feature_kd, s_feat, t_feat))
            feat = feature_term(self.feature_kd, self.projector, self.feature_loss, s_feat, t_feat)
            parts["feat"] = feat
            loss = loss + self.beta * feat
        return loss, parts

    def _soft_targets(self, teacher: nn.Module, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """Soft targets from ``teacher`` (its current mode); BN running stats untouched unless
        ``teacher_bn_update``."""
        if self.teacher_bn_update:
            freeze = contextlib.nullcontext()
        else:
            bns = self._bn_cache.get(id(teacher))
            if bns is None:  # collected once per module (teacher or snapshot)
                bns = self._bn_cache[id(teacher)] = tracking_bns(teacher)
            freeze = frozen_bn_stats(teacher, bns)
        device = model_device(teacher)  # the live teacher may sit on another GPU than x
        with torch.no_grad(), freeze, self._autocast(device):
            feat, z = split_output(teacher(to_device(x, device)))
        z = to_device(target_logits(z), self.student_device)
        return detached_to(feat, self.student_device), z

    # -- replays (the hooks of EngineBase) --------------------------------------------------
    def _replay_loss(self, teacher: nn.Module | None) -> LossFn:
        def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            t_feat, t_z = self._soft_targets(teacher, x)
            return self._student_loss(x, y, t_z, t_feat)

        return loss_fn

    def _replay_guard(self, teacher):
        # with teacher_bn_update the soft-target forward writes the teacher's BN statistics
        return (self.student, teacher if self.teacher_bn_update else None)

    @contextlib.contextmanager
    def _replay_teacher(self, reason: str) -> Iterator[nn.Module]:
        with in_mode(self.teacher, reason != "offline") as teacher:  # offline: eval mode
            yield teacher

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The shared state (:meth:`EngineBase.state_dict`) and the projector."""
        state = super().state_dict()
        state.update(projector_dims=self._projector_dims,
                     projector=None if self.projector is None else self.projector.state_dict(),
                     fresh_passes=self._fresh_passes_done)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._fresh_passes_done = int(state.get("fresh_passes", 0))  # absent before 2026-11
        if state["projector_dims"] is not None:
            if self.projector is None:
                self._make_projector(*state["projector_dims"])
            self.projector.load_state_dict(state["projector"])

