"""What both distillers share: counters, the mode table entry, recorded CE steps, the student's
step (verify, check, update, log), the replay loop, the tail, the trace and the state.

A distiller subclass says only what differs: which batch-step each ``Mode.step`` names
(``_batch_steps``), how a replayed batch's student loss is computed (``_replay_loss``) and which
modules a refused step must restore (``_replay_guard``).

The plumbing of a step (host reads, guards, checks, the optimizer step) is :mod:`.step_io`'s.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from . import graphed_steps
from .deferred_checks import DeferredChecks, check_fused
from .model_io import BufferGuard, autocast, to_device
from .modes import MODES, resolve_mode
from .options import ZERO_INTERVAL
from .overlap import Lanes
from .replay import CopyReplay, KeyedReplay, Record, mismatch_explained
from .spacing import SpacedSchedule
from .stats import LossStats
from .step_io import StepIO
from .trace import TraceWriter, batch_checksum

LossFn = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]


class EngineBase(StepIO):
    """Counters (``n`` batches handed to ``step``, ``teacher_steps``, ``student_steps``), the
    mode (``mode``: its name, ``spec``: its :class:`~.modes.Mode` entry), the spacing schedule,
    the replay buffer, the trace and the state shared by both distillers."""

    student_opt: torch.optim.Optimizer
    student_scheduler: Any = None
    offline_student_data: str = "replay"
    student_device: torch.device
    teacher_device: torch.device
    _graphs: graphed_steps.StepGraphs | None = None  # cuda_graphs (pair distiller only)

    def __init__(self, *, mode: str, interval_rate: float, self_kd: bool, steps_per_epoch: int,
                 trace, source, check_finite: bool, amp_dtype, grad_scaler, flush_tail: bool,
                 on_student_epoch_end: Callable[[int], None] | None, copy_device, copy_dtype,
                 first_replay: str = "interval", zero_interval: str = "error",
                 check_finite_every: int = 1) -> None:
        if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        if zero_interval not in ZERO_INTERVAL:
            raise ValueError(f"zero_interval must be one of {ZERO_INTERVAL}, got {zero_interval!r}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.mode = resolve_mode(mode, interval_rate, self_kd=self_kd)
        self.spec = MODES[self.mode]
        if (zero_interval == "online" and self.spec.replays == "interval" and interval_rate > 0
                and int(self.steps_per_epoch * interval_rate) == 0):
            warnings.warn(f"interval_rate={interval_rate} gives int({self.steps_per_epoch} * "
                          f"{interval_rate}) = 0 steps: running {self.spec.at_rate_zero!r} as the "
                          "official code does (zero_interval='online')", stacklevel=3)
            self.mode = self.spec.at_rate_zero
            self.spec = MODES[self.mode]
        self.interval_rate = float(interval_rate)
        self.schedule = (SpacedSchedule.build(self.steps_per_epoch, interval_rate, first_replay)
                         if self.spec.replays == "interval" else None)
        self.flush_tail = bool(flush_tail)
        self.check_finite = bool(check_finite)
        if (isinstance(check_finite_every, bool) or int(check_finite_every) != check_finite_every
                or check_finite_every < 1):
            raise ValueError("check_finite_every must be a positive integer (1: read every loss "
                             f"before its step), got {check_finite_every!r}")
        self.check_finite_every = int(check_finite_every)
        if self.check_finite and self.check_finite_every > 1:
            if grad_scaler is not None:
                raise ValueError("check_finite_every > 1 cannot be combined with a grad_scaler "
                                 "(GradScaler reads its own flag on the host every step): use "
                                 "bf16 autocast without a scaler, or check_finite_every=1")
            if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                    torch.distributed.get_world_size() > 1):
                raise ValueError("check_finite_every > 1 is not supported with several "
                                 "processes (a NaN on one rank reaches the others' gradients "
                                 "through the all-reduce): use check_finite_every=1")
            self._deferred = DeferredChecks(self.check_finite_every)
        self.amp_dtype = amp_dtype
        self.grad_scaler = grad_scaler
        self.source = source
        self.on_student_epoch_end = on_student_epoch_end
        self.trace = TraceWriter(trace) if isinstance(trace, str | os.PathLike) else trace
        self.replay_buffer: KeyedReplay | CopyReplay = (
            KeyedReplay(source) if source is not None else CopyReplay(copy_device, copy_dtype))
        self.n = 0
        self.teacher_steps = 0
        self.student_steps = 0
        self._stats = LossStats()
        self._finished = False
        self._end_steps: Iterator[int] | None = None
        self._guards: dict[int, BufferGuard] = {}
        self._lanes = Lanes(torch.device("cpu"), torch.device("cpu"), enabled=False)

    # -- what a subclass provides -----------------------------------------------------------
    def _batch_steps(self) -> dict[str, Callable[[Any, Tensor, Tensor], None]]:
        """The handler of each ``Mode.step`` value this distiller supports."""
        raise NotImplementedError

    def _replay_loss(self, teacher: nn.Module | None) -> LossFn:
        """The student loss of a replayed batch against ``teacher`` (as it stands now)."""
        raise NotImplementedError

    def _replay_guard(self, teacher: nn.Module | None) -> tuple[nn.Module | None, ...]:
        """Modules whose buffers a refused replay step must put back."""
        raise NotImplementedError

    @contextlib.contextmanager
    def _replay_teacher(self, reason: str) -> Iterator[nn.Module | None]:
        """The teacher a replay reads (in the mode that ``reason`` asks for)."""
        yield None

    # -- the step ---------------------------------------------------------------------------
    def step(self, key: Any, x: Tensor, y: Tensor) -> None:
        """Train on one batch ``x: [B, ...]``, ``y: [B]`` named ``key``: what the mode's
        ``step`` entry says, then the replay when the schedule says so."""
        if self._finished:
            raise RuntimeError("step() after finish(); build a new distiller for a new run")
        self._read_deferred(force=False)  # a run stopped by a deferred check stays stopped
        self.n += 1
        self._batch_steps()[self.spec.step](key, x, y)
        if self.schedule is not None and self.schedule.replay_due(self.n):
            self._replay("interval")
        self._read_deferred(force=self.n % self.steps_per_epoch == 0)  # every N, epoch end

    def _autocast(self, device: torch.device):
        """The models' autocast on ``device``. Under ``cuda_graphs`` without the weight-cast
        cache (torch's rule for captured work), in the warm-ups as in the captured steps; the
        eager engine's autocast is unchanged."""
        return autocast(device, self.amp_dtype, cache=self._graphs is None)

    def _check_deferred_optimizers(self, *opts: torch.optim.Optimizer | None) -> None:
        """Deferred checks skip a step through ``found_inf``: fused optimizers only."""
        if self._deferred is not None:
            check_fused(list(opts))

    # -- the two kinds of step --------------------------------------------------------------
    def _recorded_ce_step(self, model: nn.Module, ce_loss: Callable[..., Tensor], key: Any,
                          x: Tensor, y: Tensor, opt: torch.optim.Optimizer, scheduler,
                          what: str, record: bool = True, idle: list[Tensor] | tuple = ()
                          ) -> None:
        if self._graphs is not None:  # captured and replayed (ce_loss(x, y) on static copies)
            graphed_steps.ce_step(self, model, ce_loss, key, x, y, opt, scheduler, what, record,
                                  idle)
        else:
            self._eager_ce_step(model, ce_loss, key, x, y, opt, scheduler, what, record, idle)

    def _eager_ce_step(self, model, ce_loss, key, x, y, opt, scheduler, what, record, idle):
        """A CE step of the teacher (or of the deepest exit), recorded for the replay (unless
        ``record`` is false: a student that never replays this batch).

        ``ce_loss()`` runs the forward; a non-finite loss is refused inside the buffer guard
        (nothing changes), else the optimizer steps, the batch is recorded and traced.
        """
        with self._guard(model):
            loss = ce_loss()
            checksum = batch_checksum(x, y) if self._need_checksum() else None
            # the checksum is read with the loss (a record keeps host floats), unless deferred
            cs = self._check_step([(loss, "teacher", self.teacher_steps + 1)], key, what,
                                  checksum, read_checksum=self.check_finite)
        self._backward_step(loss, opt, scheduler, idle)
        self.teacher_steps += 1
        self._stats.add("teacher_loss", loss)
        if record:
            self.replay_buffer.record(key, x, y, self._record_checksum(checksum, cs))
        self._write("teacher_step", n=self.teacher_steps, epoch=(self.n - 1) // self.steps_per_epoch,
                    key=self._key_json(key), checksum=cs)

    def _record_only(self, key: Any, x: Tensor, y: Tensor) -> None:
        """Record a batch without a CE step (the official self-KD trigger batch: its replay
        step is the only step on it); a ``record`` event carries its checksum."""
        checksum = batch_checksum(x, y) if self._need_checksum() else None
        _, cs, _ = self._host_read([], checksum, None, read_checksum=(
            self.check_finite and self._deferred is None))
        self.replay_buffer.record(key, x, y, self._record_checksum(checksum, cs))
        self._write("record", n=self.n, key=self._key_json(key), checksum=cs)

    def _student_step(self, key: Any, x: Tensor, y: Tensor, *, loss_fn: LossFn,
                      guard: tuple[nn.Module | None, ...], teacher_step: int | None,
                      expected: Tensor | tuple | None = None, what: str = "",
                      stream: int | None = None) -> None:
        kw = dict(loss_fn=loss_fn, guard=guard, teacher_step=teacher_step, expected=expected,
                  what=what, stream=stream)
        if self._graphs is not None:  # captured and replayed
            graphed_steps.student_step(self, key, x, y, **kw)
        else:
            self._eager_student_step(key, x, y, **kw)

    def _eager_student_step(self, key: Any, x: Tensor, y: Tensor, *, loss_fn: LossFn,
                            guard: tuple[nn.Module | None, ...], teacher_step: int | None,
                            expected: Tensor | tuple | None = None, what: str = "",
                            stream: int | None = None) -> None:
        """One student update on ``(x, y)``: the loss, the replayed batch verified against the
        ``expected`` checksum (when given), the loss checked, the optimizer step, the log."""
        verify = expected is not None
        checksum = batch_checksum(x, y) if (verify or self.trace is not None) else None
        with self._guard(*guard):
            loss, parts = loss_fn(x, y)
            cs = self._check_step([(loss, "student", self.student_steps + 1)], key, what,
                                  checksum, expected)
        self._backward_step(loss, self.student_opt, self.student_scheduler, self._student_idle())
        self._student_done_one(key, teacher_step, cs, loss, parts, stream)

    def _student_done_one(self, key: Any, teacher_step: int | None, cs: list | None,
                          loss: Tensor, parts: dict[str, Tensor] | None,
                          stream: int | None = None) -> None:
        self.student_steps += 1
        self._stats.add("student_loss", loss)
        self._stats.add_parts(parts)
        extra = {} if stream is None else {"stream": stream}  # a batch of another data stream
        self._write("student_step", n=self.student_steps, key=self._key_json(key),
                    teacher_step=teacher_step, checksum=cs, **extra)
        epoch_end = self.student_steps % self.steps_per_epoch == 0
        if not self._lanes.enabled:  # replays and the end phase read every N steps too
            self._read_deferred(force=epoch_end and self.on_student_epoch_end is not None)
        if epoch_end and self.on_student_epoch_end:
            self.on_student_epoch_end(self.student_steps // self.steps_per_epoch)

    # -- replays ----------------------------------------------------------------------------
    def _replay(self, reason: str) -> None:
        """Replay every pending record against the teacher as it stands now."""
        for _ in self._replay_records(self.replay_buffer.take(), reason):
            pass

    def _replay_records(self, records: list[Record], reason: str) -> Iterator[int]:
        """Student steps on ``records``, in order; yields after each one (its student step).

        The batches come as one run from the buffer (``fetch_run``): a source that loads ahead
        (a worker pool) prepares the next ones while the student trains on this one."""
        if not records:
            return
        self._write("replay_start", teacher_step=self.teacher_steps, count=len(records),
                    reason=reason, rule=self._replay_rule(reason))
        batches = self.replay_buffer.fetch_run(records)
        try:
            with self._replay_teacher(reason) as teacher, mismatch_explained(self.replay_buffer):
                for rec, batch in zip(records, batches):
                    self._replay_one(rec, teacher, self.teacher_steps, batch)
                    yield self.student_steps
        finally:
            close = getattr(batches, "close", None)
            if close is not None:  # a stopped replay ends the source's look-ahead now
                close()
        self._write("replay_end", teacher_step=self.teacher_steps, count=len(records),
                    reason=reason)

    def _read_deferred(self, force: bool = False) -> None:
        with mismatch_explained(self.replay_buffer):  # a deferred check finds a mismatch here
            super()._read_deferred(force)

    def _replay_rule(self, reason: str) -> str:
        """What fired a replay, for the trace: the schedule's condition, or the end of training
        (``flush_tail``, ``offline``)."""
        if reason == "interval" and self.schedule is not None:
            return self.schedule.condition
        return {"flush": "flush_tail: end of training", "offline": "offline: end of training"
                }.get(reason, reason)

    def _replay_one(self, rec: Record, teacher: nn.Module | None, teacher_step: int,
                    batch: tuple[Tensor, Tensor] | None = None) -> None:
        """One student step on a recorded batch (``batch``: already fetched, else fetched now)."""
        x, y = batch if batch is not None else self.replay_buffer.fetch(rec)
        x = to_device(x, self.student_device)
        y = to_device(y, self.student_device)
        self._student_step(rec.key, x, y, loss_fn=self._replay_loss(teacher),
                           guard=self._replay_guard(teacher), teacher_step=teacher_step,
                           expected=rec.checksum if self.replay_buffer.verifies else None,
                           what=f", replaying against teacher step {teacher_step}")
        self._lanes.hand_over([rec.checksum if isinstance(rec.checksum, Tensor) else None,
                               *(rec.batch or ())])

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

    def end_phase(self) -> Iterator[int]:
        """The student's work after the last ``step``, one student step at a time (yields the
        student step count after each): for a mode whose ``replays`` is ``end`` (offline) the
        whole run against the final teacher in eval mode, else the tail (``flush_tail``).
        A loop that evaluates between the student's epochs drives this iterator; ``finish()``
        runs what is left of it (the same iterator: nothing runs twice)."""
        if self._end_steps is None:
            self._end_steps = self._run_end_phase()
        return self._end_steps

    def _run_end_phase(self) -> Iterator[int]:
        if self._finished:
            return
        self._join()
        if self.spec.replays != "end":
            self._flush_pending()
        elif self.offline_student_data == "fresh":
            self.replay_buffer.take()  # the student trains on new passes instead
            yield from self._fresh_passes()
        else:
            yield from self._replay_records(self.replay_buffer.take(), "offline")

    def _fresh_passes(self) -> Iterator[int]:
        """Offline, official: the student trains as many epochs as the teacher did, on the
        source's next epochs (new permutations and augmentation draws: ``epoch(E) ..
        epoch(2E - 1)`` after ``E`` teacher epochs), against the final teacher in eval mode."""
        epochs = -(-self.n // self.steps_per_epoch)
        self._write("replay_start", teacher_step=self.teacher_steps,
                    count=epochs * self.steps_per_epoch, reason="offline",
                    rule=f"offline: fresh passes, source epochs {epochs}..{2 * epochs - 1}")
        with self._replay_teacher("offline") as teacher:
            for e in range(epochs, 2 * epochs):
                for key, (x, y) in self.source.epoch(e):
                    x = to_device(x, self.student_device)
                    y = to_device(y, self.student_device)
                    self._student_step(key, x, y, loss_fn=self._replay_loss(teacher),
                                       guard=self._replay_guard(teacher),
                                       teacher_step=self.teacher_steps,
                                       what=", offline on a fresh pass")
                    yield self.student_steps
        self._write("replay_end", teacher_step=self.teacher_steps,
                    count=epochs * self.steps_per_epoch, reason="offline")

    def finish(self) -> None:
        """Complete the run: outstanding overlapped work, then :meth:`end_phase`. Idempotent."""
        if self._finished:
            return
        for _ in self.end_phase():
            pass
        self._lanes.join()
        self._read_deferred(force=True)
        self._finished = True
        self.close()

    def _join(self) -> None:
        """Overlap: issue and wait for outstanding student work (nothing without overlap)."""

    def pop_stats(self) -> dict[str, float]:
        """Means since the last call (``teacher_loss``, ``student_loss``, ``ce``, ``kl``,
        ``feat``: whichever were computed), read with one host transfer per device."""
        self._join()
        self._read_deferred(force=True)
        return self._stats.pop()

    def close(self) -> None:
        """Close the trace file (``finish()`` does it too)."""
        if self.trace is not None:
            self.trace.close()

    # -- state ------------------------------------------------------------------------------
    CHECKED_STATE = ("mode", "steps_per_epoch", "interval_rate")

    def state_dict(self) -> dict[str, Any]:
        """Counters, the configuration a resume must match, pending records (keys + checksums,
        or stored batches for CopyReplay), trace position. Outstanding overlapped work is
        completed first, and deferred checks read (a failed run saves no state)."""
        self._join()
        self._read_deferred(force=True)
        state = {name: getattr(self, name) for name in self.CHECKED_STATE}
        state.update(n=self.n, teacher_steps=self.teacher_steps,
                     student_steps=self.student_steps,
                     trace_lines=None if self.trace is None else self.trace.lines,
                     finished=self._finished, replay=self.replay_buffer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.CHECKED_STATE:
            if state[name] != getattr(self, name):
                raise ValueError(f"checkpoint {name}={state[name]!r} does not match this "
                                 f"distiller's {getattr(self, name)!r}")
        self.n, self.teacher_steps = int(state["n"]), int(state["teacher_steps"])
        self.student_steps = int(state["student_steps"])
        self._finished = bool(state["finished"])
        if self.trace is not None and state["trace_lines"] is not None:
            self.trace.resume_from(state["trace_lines"])
        self.replay_buffer.load_state_dict(state["replay"], device=self.teacher_device)
