"""SpacedDistiller and SelfDistiller: the step logic of online, spaced, offline and self KD.

The engine knows keys, tensors and modules, nothing about data formats or architectures. Rules
(SPEC sections 3 and 4) and where they live:

- *When*: :mod:`spacedkd_fast.engine.spacing` (``n % I == 0``; the official ``interval_rate``
  convention; the official self-KD first replay after one epoch).
- *What is replayed*: :mod:`spacedkd_fast.engine.replay` (keys + checksums from a replayable source, or
  stored copies); every replayed batch is checked against the checksum of the teacher step that
  recorded it before a student step uses it (keyed sources).
- *Teacher snapshot and BatchNorm*: soft targets come from the teacher as it stands when the replay
  fires, in train mode (batch statistics) with its running statistics and ``num_batches_tracked``
  untouched (BN layers briefly stop tracking) unless ``teacher_bn_update=True``.
- *Overlap*: :mod:`spacedkd_fast.engine.overlap` (CUDA only; the CPU runs the sequential order).
- *Trace*: :mod:`spacedkd_fast.engine.trace`.

Per step, at most one small device-to-host read happens (loss finiteness, replay checksum, trace
values together), and none when ``check_finite=False``, no keyed replay is verified and no trace
is written.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.objective import as_objective
from .overlap import Lanes, make_snapshot, unwrap
from .replay import CopyReplay, KeyedReplay, Record
from .spacing import SpacedSchedule, resolve_mode
from .trace import TraceWriter, batch_checksum

__all__ = [
    "SpacedDistiller",
    "SelfDistiller",
    "NonFiniteLossError",
    "ReplayMismatchError",
    "frozen_bn_stats",
]


class NonFiniteLossError(RuntimeError):
    """A loss was NaN or infinite; raised before the optimizer step that would have applied it.

    ``step``: the step count of that model (teacher steps or student steps, 1-based) whose update
    was refused; ``role``: ``"teacher"`` or ``"student"``; ``key``: the batch key.
    """

    def __init__(self, message: str, *, step: int, role: str, key: Any = None) -> None:
        super().__init__(message)
        self.step, self.role, self.key = step, role, key


class ReplayMismatchError(RuntimeError):
    """A replayable source gave back a batch whose checksum differs from the recorded one."""

    def __init__(self, message: str, *, key: Any, expected: list[float], got: list[float]) -> None:
        super().__init__(message)
        self.key, self.expected, self.got = key, expected, got


def _tracking_bns(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module, bns: list[_BatchNorm] | None = None) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalise with batch statistics in train mode but leave
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched (they briefly stop
    tracking; no buffer is copied or written). ``bns``: the layers, if already collected."""
    changed = _tracking_bns(module) if bns is None else bns
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _train(model: nn.Module) -> None:
    """Train mode, set only when the model is not in it (a per-step ``train()`` walks every
    module, and would undo a submodule the user keeps in eval mode on purpose)."""
    if not model.training:
        model.train()


def _split(out: Any) -> tuple[Tensor | None, Any]:
    """``(features, logits)`` from a model output: a tensor of logits or a pair."""
    if isinstance(out, Tensor):
        return None, out
    if isinstance(out, tuple | list) and len(out) == 2:
        return out[0], out[1]
    raise TypeError("a model must return logits [B, C] or a pair (features [B, D], logits [B, C]); "
                    f"got {type(out).__name__}")


def _ce_logits(z: Any) -> Tensor:
    """Logits that CE trains: the class head of a distilled ViT ``(cls, dist)`` pair."""
    return z[0] if isinstance(z, tuple | list) else z


def _target_logits(z: Any) -> Tensor:
    """Soft-target logits of a teacher: the mean of the heads of a ``(cls, dist)`` pair."""
    return (z[0] + z[1]) / 2 if isinstance(z, tuple | list) else z


def _to(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` (no call at all when it is there already: this runs every step)."""
    return t if t.device == device else t.to(device, non_blocking=True)


def _fp32(t: Tensor) -> Tensor:
    """Half-precision tensors go to fp32 for losses; fp32 / fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _norm_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so that device comparisons mean what they say."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _seeded(seed: int):
    """Run module construction with a private RNG, leaving the global RNG as it was."""
    rng = torch.random.fork_rng(devices=[])
    rng.__enter__()
    torch.manual_seed(seed)
    return rng


def _projection_head(student_dim: int, teacher_dim: int) -> nn.Module:
    try:  # the models package's head (same structure); fall back to a local one if absent
        from .projection import ProjectionHead
        return ProjectionHead(student_dim, teacher_dim)
    except ImportError:
        hidden = (student_dim + teacher_dim) // 2
        return nn.Sequential(nn.Linear(student_dim, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, teacher_dim))


class _BufferGuard:
    """Preallocated copies of a module's buffers: ``save`` before a forward, ``restore`` if the
    step is refused (forward passes in train mode write BN running statistics)."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = [b for b in module.buffers()]
        self.saved = [b.clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)


class _Stats:
    """Detached loss values kept on the device (folded into one sum every 256 values, so the
    list stays short); ``pop`` reads their means with one host transfer per device."""

    FOLD = 256

    def __init__(self) -> None:
        self.values: dict[str, list[Tensor]] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: Tensor) -> None:
        vals = self.values.setdefault(name, [])
        vals.append(value.detach())
        self.counts[name] = self.counts.get(name, 0) + 1
        if len(vals) >= self.FOLD:
            self.values[name] = [torch.stack([v.to(torch.float64) for v in vals]).sum()]

    def pop(self) -> dict[str, float]:
        by_device: dict[torch.device, list[str]] = {}
        for name, vals in self.values.items():
            by_device.setdefault(vals[0].device, []).append(name)
        out: dict[str, float] = {}
        for device, names in by_device.items():
            sums = torch.stack([torch.stack([v.to(device, torch.float64).reshape(())
                                             for v in self.values[n]]).sum() for n in names])
            out.update({n: v / self.counts[n] for n, v in zip(names, sums.tolist())})
        self.values, self.counts = {}, {}
        return out


class _EngineBase:
    """What both distillers share: counters, trace, finite checks, replay buffer, epoch hooks."""

    def __init__(self, *, steps_per_epoch: int, trace, source, check_finite: bool,
                 amp_dtype, grad_scaler, flush_tail: bool) -> None:
        if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.flush_tail = bool(flush_tail)
        self.check_finite = bool(check_finite)
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler
        self.source = source
        self.trace = TraceWriter(trace) if isinstance(trace, str | os.PathLike) else trace
        self.n = 0  # batches handed to step()
        self.teacher_steps = 0
        self.student_steps = 0
        self._stats = _Stats()
        self._finished = False
        self._guards: dict[int, _BufferGuard] = {}

    # -- host reads -------------------------------------------------------------------------
    def _host_read(self, losses: list[Tensor], checksum: Tensor | None,
                   expected: Tensor | tuple[float, ...] | None, read_checksum: bool = False
                   ) -> tuple[list[float | None], list | None, list | None]:
        """One device-to-host transfer for what this step must decide or log: the losses (when
        ``check_finite``), the batch checksum (when tracing, verifying or ``read_checksum``) and
        the recorded one (``expected``: on the device, or already on the host as a tuple)."""
        want_cs = checksum is not None and (read_checksum or self.trace is not None
                                            or expected is not None)
        if not want_cs and self.check_finite and len(losses) == 1:
            return [losses[0].item()], None, None  # the common case: one scalar, one read
        exp_dev = expected if isinstance(expected, Tensor) else None
        parts: list[Tensor] = []
        if self.check_finite:
            parts += [loss.detach().reshape(1).to(torch.float64) for loss in losses]
        if want_cs:
            parts.append(checksum)
            if exp_dev is not None:
                parts.append(_to(exp_dev, checksum.device))
        if not parts:
            return [None] * len(losses), None, None
        vals = torch.cat([_to(p, parts[0].device) for p in parts]).tolist()
        nl = len(losses) if self.check_finite else 0
        lossv = vals[:nl] if nl else [None] * len(losses)
        cs = vals[nl:nl + 4] if want_cs else None
        if exp_dev is not None and want_cs:
            exp = vals[nl + 4:nl + 8]
        else:
            exp = None if expected is None or exp_dev is not None else list(expected)
        return lossv, cs, exp

    @staticmethod
    def _record_checksum(device_cs: Tensor | None, host_cs: list | None):
        """What a record keeps: the host copy when this step read it anyway (a tuple of four
        floats: no tensor object per record), else the device tensor (no sync was wanted)."""
        return tuple(host_cs) if host_cs is not None else device_cs

    @contextlib.contextmanager
    def _guard(self, *modules: nn.Module | None) -> Iterator[None]:
        """Buffers (BN running statistics) of ``modules`` as they were on entry are put back if
        the block raises: a refused step leaves no trace in the model."""
        guards = []
        for m in modules:
            if m is None:
                continue
            guard = self._guards.get(id(m))
            if guard is None:  # built once per module: preallocated copies of its buffers
                guard = self._guards[id(m)] = _BufferGuard(m)
            guards.append(guard)
        for g in guards:
            g.save()
        try:
            yield
        except BaseException:
            for g in guards:
                g.restore()
            raise

    def _check_loss(self, value: float | None, role: str, step: int, key: Any, what: str) -> None:
        if value is not None and not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite {role} loss ({value}) at {role} step {step} (key {key!r}{what}); "
                "no optimizer step was taken, the weights are those after the last good step",
                step=step, role=role, key=key)

    def _need_checksum(self) -> bool:
        return self.trace is not None or self.replay_buffer.verifies

    def _write(self, event: str, **fields: Any) -> None:
        if self.trace is not None:
            self.trace.write(event, **fields)

    def _flush_pending(self) -> None:
        """End of training: replay the batches still unreplayed (``flush_tail``) or drop them
        as the official code does; either way a ``flush`` event says how many."""
        pending = len(self.replay_buffer)
        if not pending:
            return
        self._write("flush", teacher_step=self.teacher_steps,
                    replayed=pending if self.flush_tail else 0,
                    dropped=0 if self.flush_tail else pending)
        if self.flush_tail:
            self._replay("flush")
        else:
            self.replay_buffer.take()

    def _recorded_ce_step(self, model: nn.Module, ce_loss: Callable[[], Tensor], key: Any,
                          x: Tensor, y: Tensor, opt: torch.optim.Optimizer, scheduler,
                          what: str) -> None:
        """The teacher's side of a spaced step: a CE step on the batch, recorded for the replay.

        ``ce_loss()`` runs the forward; a non-finite loss is refused inside the buffer guard
        (nothing changes), else the optimizer steps, the batch is recorded and traced.
        """
        with self._guard(model):
            loss = ce_loss()
            checksum = batch_checksum(x, y) if self._need_checksum() else None
            (lossv,), cs, _ = self._host_read([loss], checksum, None,
                                              read_checksum=self.check_finite)
            self._check_loss(lossv, "teacher", self.teacher_steps + 1, key, what)
        self._backward_step(loss, opt, scheduler)
        self.teacher_steps += 1
        self._stats.add("teacher_loss", loss)
        self.replay_buffer.record(key, x, y, self._record_checksum(checksum, cs))
        self._write("teacher_step", n=self.teacher_steps, epoch=(self.n - 1) // self.steps_per_epoch,
                    key=self._key_json(key), checksum=cs)

    def _backward_step(self, loss: Tensor, opt: torch.optim.Optimizer, scheduler) -> None:
        opt.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            opt.step()
        if scheduler is not None:
            scheduler.step()

    @staticmethod
    def _key_json(key: Any) -> Any:
        return key if isinstance(key, int | str | float) or key is None else repr(key)

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (``teacher_loss``, ``student_loss``, ``ce``, ``kl``,
        ``feat``: whichever were computed), read with one host transfer per device."""
        self._join()
        return self._stats.pop()

    def _join(self) -> None:
        pass

    def close(self) -> None:
        """Close the trace file (``finish()`` does it too)."""
        if self.trace is not None:
            self.trace.close()

    def _base_state(self) -> dict[str, Any]:
        return {
            "n": self.n, "teacher_steps": self.teacher_steps, "student_steps": self.student_steps,
            "trace_lines": None if self.trace is None else self.trace.lines,
            "finished": self._finished,
        }

    def _load_base_state(self, state: dict[str, Any]) -> None:
        self.n, self.teacher_steps = int(state["n"]), int(state["teacher_steps"])
        self.student_steps = int(state["student_steps"])
        self._finished = bool(state["finished"])
        if self.trace is not None and state["trace_lines"] is not None:
            self.trace.resume_from(state["trace_lines"])


class SpacedDistiller(_EngineBase):
    """Two-model KD: ``base``, ``online``, ``spaced``, ``offline`` (SPEC section 3).

    Usage::

        d = SpacedDistiller(teacher, student, teacher_opt, student_opt, mode="spaced",
                            interval_rate=1.5, steps_per_epoch=L, loss=KDObjective(3.0, 0.3, 1.0))
        for key, (x, y) in source:      # x: [B, ...], y: [B] class indices
            d.step(key, x, y)
        d.finish()

    Models return logits ``[B, C]`` or ``(features [B, D], logits [B, C])``; with features on both
    sides and ``beta > 0`` the student gets a projection head (``.projector``, added to
    ``student_opt`` as a new param group) and the loss ``beta * feature_loss(g(f_s), f_t)``.
    ``loss`` is a :class:`~spacedkd_fast.ops.objective.KDObjective` (default: ``KDObjective()``,
    the package's one default; ``kind="paper-code"`` is the official objective), a ``KDLoss`` or
    any function ``(student_logits, teacher_logits, y) -> scalar``. ``base`` trains the student alone with CE (``teacher`` and
    ``teacher_opt`` may be ``None``). With ``source=None`` batches are kept as copies
    (``CopyReplay(copy_device, copy_dtype)``); with a :class:`ReplayableSource` only keys are kept
    and each replayed batch is verified against the recorded checksum.

    Resuming: call ``load_state_dict`` on a fresh distiller before loading ``student_opt``'s state
    (the projector's param group must exist first).
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module,
                 teacher_opt: torch.optim.Optimizer | None, student_opt: torch.optim.Optimizer, *,
                 mode: str = "spaced", interval_rate: float = 1.5, steps_per_epoch: int,
                 loss: Callable[..., Tensor] | str | None = None, beta: float = 0.0,
                 feature_loss: str | Callable[[Tensor, Tensor], Tensor] = "dist",
                 flush_tail: bool = True, teacher_bn_update: bool = False, replay: str = "keyed",
                 trace: str | os.PathLike | None = None, source: Any = None,
                 overlap: bool | str = "auto", teacher_device: torch.device | str | None = None,
                 student_device: torch.device | str | None = None, teacher_scheduler: Any = None,
                 student_scheduler: Any = None, amp_dtype: torch.dtype | None = None,
                 grad_scaler: Any = None, check_finite: bool = True,
                 on_student_epoch_end: Callable[[int], None] | None = None,
                 copy_device: torch.device | str | None = None,
                 copy_dtype: torch.dtype | None = None, projector_seed: int = 0) -> None:
        super().__init__(steps_per_epoch=steps_per_epoch, trace=trace, source=source,
                         check_finite=check_finite, amp_dtype=amp_dtype, grad_scaler=grad_scaler,
                         flush_tail=flush_tail)
        self.mode = resolve_mode(mode, interval_rate)
        if replay not in ("keyed", "fresh"):
            raise ValueError(f"replay must be 'keyed' or 'fresh', got {replay!r}")
        if replay == "fresh":
            # The official ViT loop trains the student, at each replay, on as many batches drawn
            # from a second, independently augmented train loader; reproducing that needs a
            # second augmentation stream in the replayable-source protocol.
            raise NotImplementedError(
                "replay='fresh' (the official ViT code's student training on fresh batches from a "
                "second loader) is not implemented yet; use replay='keyed'")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if self.mode != "base" and (teacher is None or teacher_opt is None):
            raise ValueError(f"mode {self.mode!r} needs a teacher and a teacher optimizer")
        self.schedule = (SpacedSchedule.build(self.steps_per_epoch, interval_rate)
                         if self.mode == "spaced" else None)
        self.interval_rate = float(interval_rate)
        self.teacher, self.student = teacher, student
        self.teacher_opt, self.student_opt = teacher_opt, student_opt
        self.teacher_scheduler, self.student_scheduler = teacher_scheduler, student_scheduler
        self.teacher_bn_update = bool(teacher_bn_update)
        self.on_student_epoch_end = on_student_epoch_end
        self.beta = float(beta)
        self.projector_seed = int(projector_seed)

        self.student_device = _norm_device(student_device) if student_device is not None \
            else _model_device(student)
        if student_device is not None:
            student.to(self.student_device)
        if teacher is not None:
            self.teacher_device = _norm_device(teacher_device) if teacher_device is not None \
                else _model_device(teacher)
            if teacher_device is not None:
                teacher.to(self.teacher_device)
        else:
            self.teacher_device = self.student_device

        self.kd = None if self.mode == "base" else as_objective(loss)
        self.feature_loss = self._build_feature_loss(feature_loss)
        if source is not None:
            self.replay_buffer: KeyedReplay | CopyReplay = KeyedReplay(source)
        else:
            self.replay_buffer = CopyReplay(copy_device, copy_dtype)
        self.projector: nn.Module | None = None
        self._projector_dims: tuple[int, int] | None = None
        if self.beta > 0 and self.mode != "base":
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

    # -- construction helpers ---------------------------------------------------------------
    @staticmethod
    def _build_feature_loss(kind):
        if callable(kind):
            return kind
        if kind == "dist":  # SPEC section 2: the unsquared L2 norm of the whole difference
            try:
                from ..ops.losses import feature_loss
                return functools.partial(feature_loss, kind="dist")
            except ImportError:
                return torch.dist
        from ..ops.losses import feature_loss
        return functools.partial(feature_loss, kind=kind)

    def _want_overlap(self, overlap) -> bool:
        if overlap not in ("auto", True, False):
            raise ValueError(f"overlap must be 'auto', True or False, got {overlap!r}")
        cuda = self.teacher_device.type == "cuda" and self.student_device.type == "cuda"
        possible = (self.mode == "spaced" and cuda and not self.teacher_bn_update
                    and self.grad_scaler is None)
        if overlap is True and not possible:
            raise ValueError(
                "overlap=True needs mode 'spaced', CUDA teacher and student, "
                "teacher_bn_update=False and no grad_scaler; use overlap='auto' or False")
        return possible if overlap == "auto" else bool(overlap)

    def _make_projector(self, s_dim: int, t_dim: int) -> None:
        rng = _seeded(self.projector_seed)
        try:
            head = _projection_head(s_dim, t_dim)
        finally:
            rng.__exit__(None, None, None)
        p = next(iter(self.student.parameters()), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else None
        self.projector = head.to(device=self.student_device, dtype=dtype)
        self._projector_dims = (s_dim, t_dim)
        self.student_opt.add_param_group({"params": list(self.projector.parameters())})

    # -- the step ---------------------------------------------------------------------------
    def step(self, key: Any, x: Tensor, y: Tensor) -> None:
        """Train on one batch ``x: [B, ...]``, ``y: [B]`` named ``key``; the student replays when
        the schedule says so."""
        if self._finished:
            raise RuntimeError("step() after finish(); build a new distiller for a new run")
        self.n += 1
        if self.mode == "base":
            self._base_step(key, x, y)
        elif self.mode == "online":
            self._online_step(key, x, y)
        else:
            self._teacher_record_step(key, x, y)
            if self._queue:  # overlap: one student step of the previous interval per teacher step
                self._issue_queued(1)
            if self.mode == "spaced" and self.schedule.replay_due(self.n):
                self._replay("interval")

    def _teacher_forward_train(self, x: Tensor) -> tuple[Tensor | None, Any]:
        _train(self.teacher)
        with _autocast(self.teacher_device, self.amp_dtype):
            return _split(self.teacher(x))

    def _teacher_record_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        x = _to(x, self.teacher_device)
        y = _to(y, self.teacher_device)
        def ce_loss() -> Tensor:
            _, z = self._teacher_forward_train(x)
            return F.cross_entropy(_fp32(_ce_logits(z)), y)

        self._recorded_ce_step(self.teacher, ce_loss, key, x, y, self.teacher_opt,
                               self.teacher_scheduler, "")

    def _base_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        x = _to(x, self.student_device)
        y = _to(y, self.student_device)
        _train(self.student)
        with self._guard(self.student):
            with _autocast(self.student_device, self.amp_dtype):
                _, z = _split(self.student(x))
            loss = F.cross_entropy(_fp32(_ce_logits(z)), y)
            checksum = batch_checksum(x, y) if self.trace is not None else None
            (lossv,), cs, _ = self._host_read([loss], checksum, None)
            self._check_loss(lossv, "student", self.student_steps + 1, key, "")
        self._backward_step(loss, self.student_opt, self.student_scheduler)
        self._student_done_one(key, None, cs, loss, None)

    def _online_step(self, key: Any, x: Tensor, y: Tensor) -> None:
        xt = _to(x, self.teacher_device)
        yt = _to(y, self.teacher_device)
        # both losses are checked before either model is updated: a refused step writes nothing
        with self._guard(self.teacher, self.student):
            t_feat, t_z = self._teacher_forward_train(xt)
            t_loss = F.cross_entropy(_fp32(_ce_logits(t_z)), yt)
            xs = _to(x, self.student_device)
            ys = _to(y, self.student_device)
            target = _to(_target_logits(t_z).detach(), self.student_device)
            feat = None if t_feat is None else _to(t_feat.detach(), self.student_device)
            s_loss, parts = self._student_loss(xs, ys, target, feat)
            checksum = batch_checksum(xt, yt) if self.trace is not None else None
            (tv, sv), cs, _ = self._host_read([t_loss, s_loss], checksum, None)
            self._check_loss(tv, "teacher", self.teacher_steps + 1, key, "")
            self._check_loss(sv, "student", self.student_steps + 1, key, "")
        self._backward_step(t_loss, self.teacher_opt, self.teacher_scheduler)
        self.teacher_steps += 1
        self._stats.add("teacher_loss", t_loss)
        self._write("teacher_step", n=self.teacher_steps, epoch=(self.n - 1) // self.steps_per_epoch,
                    key=self._key_json(key), checksum=cs)
        self._backward_step(s_loss, self.student_opt, self.student_scheduler)
        self._student_done_one(key, self.teacher_steps - 1, cs, s_loss, parts)

    # -- the student's KD step --------------------------------------------------------------
    def _student_loss(self, x: Tensor, y: Tensor, t_logits: Tensor, t_feat: Tensor | None
                      ) -> tuple[Tensor, dict[str, Tensor]]:
        _train(self.student)
        with _autocast(self.student_device, self.amp_dtype):
            s_feat, s_z = _split(self.student(x))
        kd_logits = s_z[1] if isinstance(s_z, tuple | list) else s_z
        if kd_logits.shape != t_logits.shape:
            raise ValueError(
                f"student and teacher logits must have the same shape [B, C]; got student "
                f"{tuple(kd_logits.shape)} and teacher {tuple(t_logits.shape)}")
        parts: dict[str, Tensor] = {}
        loss = self._kd(s_z, t_logits, y, parts)
        if self.beta > 0 and s_feat is not None and t_feat is not None:
            if self.projector is None:
                self._make_projector(s_feat.shape[-1], t_feat.shape[-1])
            # the small head runs in fp32 (its input may come out of autocast in half precision)
            feat = self.feature_loss(self.projector(_fp32(s_feat)), _fp32(t_feat))
            parts["feat"] = feat
            loss = loss + self.beta * feat
        return loss, parts

    def _kd(self, s_z: Any, t_logits: Tensor, y: Tensor, parts: dict[str, Tensor]) -> Tensor:
        loss, kd_parts = self.kd(s_z, t_logits, y)
        parts.update(kd_parts)
        return loss

    def _student_done_one(self, key: Any, teacher_step: int | None, cs: list | None,
                          loss: Tensor, parts: dict[str, Tensor] | None) -> None:
        self.student_steps += 1
        self._stats.add("student_loss", loss)
        for name, v in (parts or {}).items():
            self._stats.add(name, v)
        self._write("student_step", n=self.student_steps, key=self._key_json(key),
                    teacher_step=teacher_step, checksum=cs)
        if self.student_steps % self.steps_per_epoch == 0 and self.on_student_epoch_end:
            self.on_student_epoch_end(self.student_steps // self.steps_per_epoch)

    def _soft_targets(self, teacher: nn.Module, x: Tensor) -> tuple[Tensor | None, Tensor]:
        """Soft targets from ``teacher`` (its current mode); BN running stats untouched unless
        ``teacher_bn_update``."""
        if self.teacher_bn_update:
            freeze = contextlib.nullcontext()
        else:
            bns = self._bn_cache.get(id(teacher))
            if bns is None:  # collected once per module (teacher or snapshot)
                bns = self._bn_cache[id(teacher)] = _tracking_bns(teacher)
            freeze = frozen_bn_stats(teacher, bns)
        device = _model_device(teacher)  # the live teacher may sit on another GPU than x
        with torch.no_grad(), freeze, _autocast(device, self.amp_dtype):
            feat, z = _split(teacher(_to(x, device)))
        z = _to(_target_logits(z), self.student_device)
        return (None if feat is None else _to(feat, self.student_device)), z

    def _replay_one(self, rec: Record, teacher: nn.Module, teacher_step: int) -> None:
        x, y = self.replay_buffer.fetch(rec)
        x = _to(x, self.student_device)
        y = _to(y, self.student_device)
        verify = self.replay_buffer.verifies
        checksum = batch_checksum(x, y) if (verify or self.trace is not None) else None
        # with teacher_bn_update the soft-target forward writes the teacher's BN statistics
        with self._guard(self.student, teacher if self.teacher_bn_update else None):
            t_feat, t_z = self._soft_targets(teacher, x)
            loss, parts = self._student_loss(x, y, t_z, t_feat)
            (lossv,), cs, expected = self._host_read([loss], checksum,
                                                     rec.checksum if verify else None)
            if verify and cs != expected:
                raise ReplayMismatchError(
                    f"the source gave back a different batch for key {rec.key!r} (checksum {cs}, "
                    f"recorded by the teacher step: {expected}); refusing to train the student "
                    "on it", key=rec.key, expected=expected, got=cs)
            self._check_loss(lossv, "student", self.student_steps + 1, rec.key,
                             f", replaying against teacher step {teacher_step}")
        self._backward_step(loss, self.student_opt, self.student_scheduler)
        self._lanes.hand_over([rec.checksum if isinstance(rec.checksum, Tensor) else None,
                               *(rec.batch or ())])
        self._student_done_one(rec.key, teacher_step, cs, loss, parts)

    # -- replays ----------------------------------------------------------------------------
    def _replay(self, reason: str) -> None:
        """Replay every pending record against the teacher as it stands now."""
        records = self.replay_buffer.take()
        if not records:
            return
        if self.overlap and reason == "interval":
            self._issue_queued(len(self._queue))  # the previous interval must be fully issued
            if self._snapshot is None:
                self._snapshot = make_snapshot(self.teacher, self.student_device)
            self._lanes.publish_snapshot(self._snapshot, self.teacher)
            self._queue, self._queue_teacher_step = records, self.teacher_steps
            self._queue_count = len(records)
            self._write("replay_start", teacher_step=self.teacher_steps, count=len(records),
                        reason=reason)
            return
        self._write("replay_start", teacher_step=self.teacher_steps, count=len(records),
                    reason=reason)
        teacher = unwrap(self.teacher)
        was_training, want = teacher.training, reason != "offline"  # offline: eval mode
        if was_training != want:
            teacher.train(want)
        try:
            for rec in records:
                self._replay_one(rec, teacher, self.teacher_steps)
        finally:
            if was_training != want:
                teacher.train(was_training)
        self._write("replay_end", teacher_step=self.teacher_steps, count=len(records),
                    reason=reason)

    def _issue_queued(self, count: int) -> None:
        """Overlap: issue ``count`` queued student steps on the student lane."""
        count = min(count, len(self._queue))
        if count == 0:
            return
        batch, self._queue = self._queue[:count], self._queue[count:]
        with self._lanes.student():
            for rec in batch:
                self._replay_one(rec, self._snapshot, self._queue_teacher_step)
        if not self._queue:
            self._lanes.mark_student_done()
            self._write("replay_end", teacher_step=self._queue_teacher_step,
                        count=self._queue_count, reason="interval")

    def _join(self) -> None:
        self._issue_queued(len(self._queue))
        self._lanes.join()

    def finish(self) -> None:
        """Complete the run: issue outstanding overlapped work, then replay the tail
        (``flush_tail``) or, in ``offline`` mode, the whole run against the final teacher in eval
        mode. Idempotent."""
        if self._finished:
            return
        self._join()
        if self.mode == "offline":
            self._replay("offline")
        else:
            self._flush_pending()
        self._lanes.join()
        self._finished = True
        self.close()

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, pending records (keys + checksums, or stored batches for CopyReplay),
        projector, trace position. Outstanding overlapped work is completed first."""
        self._join()
        state = self._base_state()
        state.update(
            mode=self.mode, interval_rate=self.interval_rate, steps_per_epoch=self.steps_per_epoch,
            replay=self.replay_buffer.state_dict(),
            projector_dims=self._projector_dims,
            projector=None if self.projector is None else self.projector.state_dict(),
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("mode", "steps_per_epoch"):
            if state[name] != getattr(self, name):
                raise ValueError(f"checkpoint {name}={state[name]!r} does not match this "
                                 f"distiller's {getattr(self, name)!r}")
        if state["interval_rate"] != self.interval_rate:
            raise ValueError(f"checkpoint interval_rate={state['interval_rate']} does not match "
                             f"{self.interval_rate}")
        self._load_base_state(state)
        self.replay_buffer.load_state_dict(state["replay"], device=self.teacher_device)
        if state["projector_dims"] is not None:
            if self.projector is None:
                self._make_projector(*state["projector_dims"])
            self.projector.load_state_dict(state["projector"])


class SelfDistiller(_EngineBase):
    """Self KD of one multi-exit model: modes ``self`` and ``spaced-self`` (SPEC sections 3, 4).

    The model returns ``(features_list, logits_list)`` (deepest exit LAST; features ``[B, D]``,
    logits ``[B, C]``) and may have ``adapters`` (``nn.ModuleList`` of ``num_exits - 1`` layers)
    applied to the shallow exits' features. A KD step's loss::

        CE(z_K, y) + sum_i [alpha * kd_scale * softCE(z_i / T, z_K / T) + (1 - alpha) * CE(z_i, y)]
                   + beta * sum_i ||A_i(f_i) - f_K||_2          (z_K, f_K detached in the KD terms)

    ``spaced-self``: CE of the deepest exit only on each step; at ``n = I, 2I, ...`` the recorded
    batches are replayed with the KD loss (the network keeps learning during the replay).
    ``self_kd_first_replay="one-epoch"`` and ``self_kd_feature_exits="official"`` reproduce the
    official code (first replay at ``n = L``; no feature loss on the exit just before the deepest).
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, *, mode: str = "spaced-self",
                 interval_rate: float = 4.0, steps_per_epoch: int, temperature: float = 3.0,
                 alpha: float = 0.3, beta: float = 0.03, kd_scale: float = 1.0,
                 flush_tail: bool = True, self_kd_first_replay: str = "interval",
                 self_kd_feature_exits: str = "all", trace: str | os.PathLike | None = None,
                 source: Any = None, scheduler: Any = None, amp_dtype: torch.dtype | None = None,
                 grad_scaler: Any = None, check_finite: bool = True,
                 on_student_epoch_end: Callable[[int], None] | None = None,
                 copy_device: torch.device | str | None = None,
                 copy_dtype: torch.dtype | None = None) -> None:
        super().__init__(steps_per_epoch=steps_per_epoch, trace=trace, source=source,
                         check_finite=check_finite, amp_dtype=amp_dtype, grad_scaler=grad_scaler,
                         flush_tail=flush_tail)
        self.mode = resolve_mode(mode, interval_rate, self_kd=True)
        if self_kd_feature_exits not in ("all", "official"):
            raise ValueError("self_kd_feature_exits must be 'all' or 'official', got "
                             f"{self_kd_feature_exits!r}")
        if temperature <= 0 or not 0 <= alpha <= 1 or beta < 0:
            raise ValueError(f"need temperature > 0, 0 <= alpha <= 1, beta >= 0; got "
                             f"{temperature}, {alpha}, {beta}")
        self.schedule = (SpacedSchedule.build(self.steps_per_epoch, interval_rate,
                                              self_kd_first_replay)
                         if self.mode == "spaced-self" else None)
        self.interval_rate = float(interval_rate)
        self.model, self.opt, self.scheduler = model, opt, scheduler
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        self.kd_scale = float(kd_scale)
        self.feature_exits = self_kd_feature_exits
        self.on_student_epoch_end = on_student_epoch_end
        self.device = _model_device(model)
        self.replay_buffer = KeyedReplay(source) if source is not None \
            else CopyReplay(copy_device, copy_dtype)

    def _forward(self, x: Tensor) -> tuple[list[Tensor] | None, list[Tensor]]:
        _train(self.model)
        with _autocast(self.device, self.amp_dtype):
            out = self.model(x)
        feats, logits = _split(out)
        if isinstance(logits, Tensor) or len(logits) < 2:
            raise TypeError("SelfDistiller needs a multi-exit model returning (features_list, "
                            "logits_list) with at least two exits, deepest last")
        shapes = {tuple(z.shape) for z in logits}
        if len(shapes) != 1:
            raise ValueError(f"all exits' logits must have the same shape [B, C], got {shapes}")
        return feats, list(logits)

    def self_kd_loss(self, feats: list[Tensor] | None, logits: list[Tensor], y: Tensor
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of SPEC section 4 for one batch (see the class docstring)."""
        from ..ops.losses import kd_loss
        deep = _fp32(logits[-1])
        target = deep.detach()
        ce_deep = F.cross_entropy(deep, y)
        loss = ce_deep
        kl_sum = deep.new_zeros(())
        for z in logits[:-1]:
            # kd_loss gives (1-a) CE + a k KL(q||p); softCE = KL + H(q), a constant in the student:
            # add a k H(q) back (detached) so that the value is the SPEC's softCE form.
            term, _, kl = kd_loss(_fp32(z), target, y, temperature=self.temperature,
                                  alpha=self.alpha, kd_scale=self.kd_scale, return_parts=True)
            loss = loss + term
            kl_sum = kl_sum + kl
        q = F.softmax(target / self.temperature, dim=-1)
        entropy = -(q * F.log_softmax(target / self.temperature, dim=-1)).sum(-1).mean()
        loss = loss + (len(logits) - 1) * self.alpha * self.kd_scale * entropy.detach()
        parts = {"ce": ce_deep.detach(), "kl": kl_sum / (len(logits) - 1)}
        if self.beta > 0 and feats is not None:
            adapters = getattr(unwrap(self.model), "adapters", None)
            f_deep = _fp32(feats[-1].detach())
            shallow = range(len(feats) - 1)
            if self.feature_exits == "official":  # the official code skips the layer-3 exit
                shallow = range(len(feats) - 2)
            feat = deep.new_zeros(())
            for i in shallow:
                f = _fp32(feats[i])  # adapters run in fp32 (autocast may give half features)
                f = f if adapters is None else adapters[i](f)
                feat = feat + torch.dist(_fp32(f), f_deep)
            parts["feat"] = feat.detach()
            loss = loss + self.beta * feat
        return loss, parts

    def step(self, key: Any, x: Tensor, y: Tensor) -> None:
        """One batch ``x: [B, ...]``, ``y: [B]``: a KD step (``self``) or a deepest-exit CE step
        followed, when due, by the replay (``spaced-self``)."""
        if self._finished:
            raise RuntimeError("step() after finish(); build a new distiller for a new run")
        self.n += 1
        x = _to(x, self.device)
        y = _to(y, self.device)
        if self.mode == "self":
            self._kd_step(key, x, y, expected=None, teacher_step=self.n)
            return
        def ce_loss() -> Tensor:
            _, logits = self._forward(x)
            return F.cross_entropy(_fp32(logits[-1]), y)

        self._recorded_ce_step(self.model, ce_loss, key, x, y, self.opt, self.scheduler,
                               " (deepest-exit CE)")
        if self.schedule.replay_due(self.n):
            self._replay("interval")

    def _kd_step(self, key: Any, x: Tensor, y: Tensor, expected: Tensor | tuple | None,
                 teacher_step: int) -> None:
        verify = expected is not None
        checksum = batch_checksum(x, y) if (verify or self.trace is not None) else None
        with self._guard(self.model):
            feats, logits = self._forward(x)
            loss, parts = self.self_kd_loss(feats, logits, y)
            (lossv,), cs, exp = self._host_read([loss], checksum, expected)
            if verify and cs != exp:
                raise ReplayMismatchError(
                    f"the source gave back a different batch for key {key!r} (checksum {cs}, "
                    f"recorded: {exp}); refusing to train on it", key=key, expected=exp, got=cs)
            self._check_loss(lossv, "student", self.student_steps + 1, key, " (self-KD)")
        self._backward_step(loss, self.opt, self.scheduler)
        self.student_steps += 1
        self._stats.add("student_loss", loss)
        for name, v in parts.items():
            self._stats.add(name, v)
        self._write("student_step", n=self.student_steps, key=self._key_json(key),
                    teacher_step=teacher_step, checksum=cs)
        if self.student_steps % self.steps_per_epoch == 0 and self.on_student_epoch_end:
            self.on_student_epoch_end(self.student_steps // self.steps_per_epoch)

    def _replay(self, reason: str) -> None:
        records = self.replay_buffer.take()
        if not records:
            return
        self._write("replay_start", teacher_step=self.teacher_steps, count=len(records),
                    reason=reason)
        for rec in records:
            x, y = self.replay_buffer.fetch(rec)
            x = _to(x, self.device)
            y = _to(y, self.device)
            expected = rec.checksum if self.replay_buffer.verifies else None
            self._kd_step(rec.key, x, y, expected, self.teacher_steps)
        self._write("replay_end", teacher_step=self.teacher_steps, count=len(records),
                    reason=reason)

    def finish(self) -> None:
        """Replay the tail (``flush_tail``) or drop it. Idempotent."""
        if self._finished:
            return
        self._flush_pending()
        self._finished = True
        self.close()

    def state_dict(self) -> dict[str, Any]:
        state = self._base_state()
        state.update(mode=self.mode, interval_rate=self.interval_rate,
                     steps_per_epoch=self.steps_per_epoch, replay=self.replay_buffer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("mode", "steps_per_epoch", "interval_rate"):
            if state[name] != getattr(self, name):
                raise ValueError(f"checkpoint {name}={state[name]!r} does not match this "
                                 f"distiller's {getattr(self, name)!r}")
        self._load_base_state(state)
        self.replay_buffer.load_state_dict(state["replay"], device=self.device)
