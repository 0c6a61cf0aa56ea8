"""The training loop: epochs of keyed batches into the distiller, an evaluation row per epoch, a
checkpoint at each epoch end (and mid-epoch on a stop request or as ``--checkpoint-every`` asks),
then offline KD's student phase (which takes no mid-phase checkpoints: a resume restarts it from
the teacher's last epoch).

Exactness of resume: checkpoints hold models, optimisers, schedules, the engine's state (pending
replay keys), the gradient scaler, every RNG state, the epoch's loss sums and the metric rows.
Batches come from the keyed source, so the epoch after a resume sees exactly the batches it would
have seen. Loss accumulators are read at steps ``n`` with ``n % log_every == 0`` and at the steps
of ``--checkpoint-every N`` (never at clock-dependent moments: time-based checkpoints wait for a
log point), so the per-epoch means are computed in the same order too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..engine.model_io import unwrap
from . import faults
from .build import RunParts
from .checkpoint import checkpoint_payload, rng_state, save_checkpoint
from .errors import Interrupted
from .evaluate import evaluate
from .history import RunHistory
from .lr_schedule import EpochSchedule
from .metric_names import test_key, with_aliases
from .report import ProgressBar, loss_labels
from .resume_policy import CheckpointEvery, parse_checkpoint_every
from .stop import StopRequest

# the values of the earlier "phase" field (kept as an alias for one version)
LEGACY_PHASE = {"teacher+student": "train", "model": "train", "network": "train"}


class EpochSums:
    """Loss means of one epoch, from the engine's ``pop_stats`` means weighted by step counts."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.counts: dict[str, int] = dict((state or {}).get("counts", {}))

    def add(self, popped: dict[str, float], teacher_steps: int, student_steps: int) -> None:
        for key, mean in popped.items():
            weight = teacher_steps if key == "teacher_loss" else student_steps
            if weight <= 0 or mean is None:
                continue
            self.sums[key] = self.sums.get(key, 0.0) + mean * weight
            self.counts[key] = self.counts.get(key, 0) + weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts.get(k)}

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}


@dataclass
class Position:
    """Where the run stands when a checkpoint is taken."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps done in the epoch in progress
    sums: EpochSums = field(default_factory=EpochSums)
    images: int = 0  # images of the epoch in progress
    wall: float = 0.0  # seconds spent in the epoch in progress
    finished: bool = False


# ------------------------------------------------------------------------------ checkpoints
def _gather(obj: Any, parts: RunParts) -> list[Any]:
    """``obj`` of every rank, in rank order (on every rank)."""
    if not parts.info.enabled:
        return [obj]
    out: list[Any] = [None] * parts.info.world_size
    dist.all_gather_object(out, obj)
    return out


class Checkpoints:
    """Where the run's checkpoints fall within epochs (``--checkpoint-every``), and when the last
    one was written."""

    def __init__(self, every: CheckpointEvery) -> None:
        self.every = every
        self.last = time.monotonic()

    def step_due(self, key: int) -> bool:
        return self.every.steps is not None and key % self.every.steps == 0

    def time_due(self) -> bool:
        return (self.every.seconds is not None
                and time.monotonic() - self.last >= self.every.seconds)


def save(parts: RunParts, history: RunHistory, position: Position,
         checkpoints: Checkpoints | None = None) -> None:
    """Every rank's engine and RNG state gathered, rank 0 writes ``checkpoint.pt`` (atomically)."""
    engines = _gather(parts.distiller.state_dict(), parts)
    rngs = _gather(rng_state(), parts)
    faults.point("save", position.epoch * parts.steps_per_epoch + position.step_in_epoch)
    if checkpoints is not None:
        checkpoints.last = time.monotonic()
    if parts.info.is_main:
        save_checkpoint(history.out, checkpoint_payload(parts, history, position, engines=engines,
                                                        rngs=rngs))


# ------------------------------------------------------------------------------ evaluation
def _evaluate(parts: RunParts, model) -> dict[str, float]:
    if parts.info.enabled:
        # DDP broadcasts rank 0's buffers at each forward, then every rank updates its own BN
        # statistics with its own share: evaluate all ranks with rank 0's (what is saved).
        with torch.no_grad():
            for b in unwrap(model).buffers():
                dist.broadcast(b, src=0)
    return evaluate(model, parts.data.test(), device=parts.device, amp_dtype=parts.amp_dtype,
                    channels_last=parts.cfg.channels_last, info=parts.info)


def epoch_row(parts: RunParts, history: RunHistory, epoch: int, trained: str, sums: EpochSums,
              images: int, epoch_wall: float, teacher_metrics: dict[str, float] | None = None
              ) -> dict[str, Any]:
    """Test accuracies after ``epoch``, the epoch's training-loss means, counters and speed
    (names: :mod:`.metric_names`). ``trained``: which models trained in this epoch."""
    row: dict[str, Any] = {"epoch": epoch, "trained": trained,
                           "phase": LEGACY_PHASE.get(trained, trained)}
    if parts.cfg.is_self:
        m = _evaluate(parts, parts.student)
        exits = sorted(k for k in m if k.startswith("exit") and k.endswith("_top1"))
        deepest = exits[-1].removesuffix("_top1") if exits else None
        row[test_key("teacher")] = m.get(f"{deepest}_top1") if deepest else None
        row[test_key("teacher", "top5")] = m.get(f"{deepest}_top5") if deepest else None
        row[test_key("student")], row[test_key("student", "top5")] = m["top1"], m["top5"]
        row.update({f"test_{k}": v for k, v in m.items() if k.startswith(("exit", "ensemble"))})
    else:
        if parts.teacher is not None:
            tm = teacher_metrics if teacher_metrics is not None else _evaluate(parts, parts.teacher)
            row[test_key("teacher")], row[test_key("teacher", "top5")] = tm["top1"], tm["top5"]
        else:
            row[test_key("teacher")] = row[test_key("teacher", "top5")] = None
        sm = _evaluate(parts, parts.student)
        row[test_key("student")], row[test_key("student", "top5")] = sm["top1"], sm["top5"]
    means = sums.means()
    row["train_teacher_loss"] = means.get("teacher_loss")
    row["train_student_loss"] = means.get("student_loss")
    for key in ("ce", "kl", "feat"):
        if key in means:
            row[f"train_{key}"] = means[key]
    row["lr"] = parts.lr()
    row["student_lr"] = float(parts.student_opt.param_groups[0]["lr"])  # a tensor under graphs
    row["teacher_steps"] = parts.distiller.teacher_steps
    row["student_steps"] = parts.distiller.student_steps
    row["images_per_s"] = images / epoch_wall if epoch_wall > 0 else None
    row["epoch_s"] = epoch_wall
    row["wall_s"] = history.wall()
    return with_aliases(row)


# ------------------------------------------------------------------------------ the loop
def _stop_requested(parts: RunParts, stop: StopRequest, at_log_point: bool) -> bool:
    return _agree(parts, stop, at_log_point, False)[0]


def _agree(parts: RunParts, stop: StopRequest, at_log_point: bool, save_due: bool
           ) -> tuple[bool, bool]:
    """``(stop, save now)`` as every rank decides them: a rank that received the signal, or whose
    clock says a checkpoint is due, decides for all, at a log point (the steps every rank shares),
    so that every rank stops or saves after the same step."""
    if not parts.info.enabled:
        return stop.requested, save_due
    if not at_log_point:  # ranks agree only at the shared log points
        return False, False
    flag = torch.tensor([int(stop.requested), int(save_due)], device=parts.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    halt, due = flag.tolist()
    return bool(halt), bool(due)


def _trained(parts: RunParts, teacher_steps: int, student_steps: int) -> str:
    """What trained in an epoch of the main loop: the networks whose step counters moved (a spaced
    student takes no step before its first replay; ``none`` says that nothing did)."""
    if parts.teacher is None:
        moved = student_steps > 0 or teacher_steps > 0
        return ("network" if parts.cfg.is_self else "model") if moved else "none"
    names = [n for n, k in (("teacher", teacher_steps), ("student", student_steps)) if k > 0]
    return "+".join(names) or "none"


def _train_epoch(parts: RunParts, history: RunHistory, stop: StopRequest, epoch: int,
                 at: Position, checkpoints: Checkpoints, *, progress: bool) -> None:
    """One epoch from step ``at.step_in_epoch``; saves and raises ``Interrupted`` on a stop."""
    cfg, d, L = parts.cfg, parts.distiller, parts.steps_per_epoch
    sums, images0, wall0 = at.sums, at.images, at.wall
    for sched in (parts.teacher_sched, parts.student_sched):
        if isinstance(sched, EpochSchedule):  # the official clock: every step of epoch e at lr(e)
            sched.set_epoch(epoch)
    t0 = time.monotonic()
    bar = ProgressBar(L, f"epoch {epoch + 1}/{cfg.epochs}", stream=history.stream,
                      enabled=progress and parts.info.is_main, labels=loss_labels(cfg))
    images, done = images0, at.step_in_epoch
    last_t, last_s = d.teacher_steps, d.student_steps
    first_t, first_s = last_t, last_s
    # a mid-epoch resume starts at the next batch; the source names the keys
    for key, (x, y) in parts.source.epoch(epoch, start=at.step_in_epoch):
        d.step(key, x, y)
        faults.point("step", key)
        done += 1
        images += x.shape[0] * parts.info.world_size
        step_due = checkpoints.step_due(key)  # a log point too: the saved sums are complete
        log_point = key % cfg.log_every == 0 or done == L or step_due
        stats = None
        if log_point:
            stats = d.pop_stats()
            sums.add(stats, d.teacher_steps - last_t, d.student_steps - last_s)
            last_t, last_s = d.teacher_steps, d.student_steps
        bar.update(done, images - images0, stats=stats, lr=parts.lr())
        if done == L:
            continue  # the epoch's end saves below
        halt, time_due = _agree(parts, stop, log_point, log_point and checkpoints.time_due())
        if halt:
            if not log_point:
                sums.add(d.pop_stats(), d.teacher_steps - last_t, d.student_steps - last_s)
            bar.close()
            save(parts, history, Position(epoch, done, sums, images,
                                          wall0 + time.monotonic() - t0), checkpoints)
            raise Interrupted
        if step_due or time_due:
            save(parts, history, Position(epoch, done, sums, images,
                                          wall0 + time.monotonic() - t0), checkpoints)
    bar.close()
    last = epoch == cfg.epochs - 1
    if last and cfg.mode != "offline":
        d.finish()  # replay the tail before the final evaluation
        sums.add(d.pop_stats(), d.teacher_steps - last_t, d.student_steps - last_s)
    wall = wall0 + time.monotonic() - t0
    trained = _trained(parts, d.teacher_steps - first_t, d.student_steps - first_s)
    history.record(epoch_row(parts, history, epoch + 1, trained, sums, images, wall))
    save(parts, history, Position(epoch + 1, finished=last and cfg.mode != "offline"),
         checkpoints)
    if not last and _stop_requested(parts, stop, True):
        raise Interrupted


def _offline_student_phase(parts: RunParts, history: RunHistory, stop: StopRequest) -> None:
    """Offline KD after the teacher's epochs: the student's epochs, each evaluated."""
    cfg, d = parts.cfg, parts.distiller
    last = history.rows[-1] if history.rows else None
    final_teacher = ({"top1": last[test_key("teacher")], "top5": last[test_key("teacher", "top5")]}
                     if last else None)
    history.say(f"offline KD: teacher done; the student now trains {cfg.epochs} epochs against "
                "the final teacher")
    if isinstance(parts.student_sched, EpochSchedule):
        parts.student_sched.set_epoch(None)  # the student's own epochs from here on
    L = parts.steps_per_epoch
    steps_before, t0 = d.student_steps, time.monotonic()
    for student_steps in d.end_phase():  # one student step at a time, against the final teacher
        if student_steps % L:
            continue
        student_epoch = student_steps // L
        sums = EpochSums()
        sums.add(d.pop_stats(), 0, d.student_steps - steps_before)
        steps_before, now = d.student_steps, time.monotonic()
        wall, t0 = now - t0, now
        history.record(epoch_row(parts, history, cfg.epochs + student_epoch, "student", sums,
                                 parts.num_train_samples(), wall, teacher_metrics=final_teacher))
        if student_epoch < cfg.epochs and _stop_requested(parts, stop, True):
            history.say("interrupted during the offline student phase, which a resume "
                        f"restarts from the teacher's final checkpoint (epoch {cfg.epochs})")
            raise Interrupted
    d.finish()  # the phase is done; this completes the engine's bookkeeping
    save(parts, history, Position(cfg.epochs, finished=True))


def run_loop(parts: RunParts, history: RunHistory, stop: StopRequest,
             state: dict[str, Any] | None, *, progress: bool) -> None:
    """Train from ``state`` (a checkpoint, or ``None`` for a new run) to the end of the run."""
    state = state or {}
    start_epoch = int(state.get("epoch", 0))
    start_step = int(state.get("step_in_epoch", 0))
    at = Position(start_epoch, start_step)
    if start_step:  # a mid-epoch checkpoint carries the epoch's partial sums
        at.sums = EpochSums(state.get("epoch_sums"))
        at.images = int(state.get("epoch_images", 0))
        at.wall = float(state.get("epoch_wall", 0.0))
    checkpoints = Checkpoints(parse_checkpoint_every(parts.cfg.checkpoint_every))
    for epoch in range(start_epoch, parts.cfg.epochs):
        _train_epoch(parts, history, stop, epoch, at, checkpoints, progress=progress)
        at = Position(epoch + 1)
    if parts.cfg.mode == "offline" and not state.get("finished", False):
        _offline_student_phase(parts, history, stop)
    if parts.teacher is not None and parts.distiller.student_steps == 0:
        history.say("warning: the student took no training step in this run (its spacing "
                    f"interval, {parts.cfg.interval_rate:g} epochs, was never completed within "
                    f"{parts.cfg.epochs} epoch{'s' if parts.cfg.epochs != 1 else ''}); its accuracy is that of its initial weights. "
                    "Train more epochs or use a smaller --interval-rate.")
