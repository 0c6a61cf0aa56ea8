"""How a spaced pair's student catches up at a replay point: the sequential replay (the base's),
the overlapped replay on a second CUDA stream (one student step per teacher step of the next
interval, against a snapshot), or the official ViT loop's catch-up on a second data stream.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .model_io import to_device
from .overlap import make_snapshot
from .replay import Record
from .spacing import catch_up_passes


class SpacedReplays:
    """Mixed into :class:`~.spaced.SpacedDistiller` (before :class:`~.base.EngineBase`)."""

    replay: str
    overlap: bool
    shared_optimizer: bool
    teacher: nn.Module | None
    source: Any
    _queue: list[Record]
    _snapshot: nn.Module | None
    _fresh_passes_done: int

    def _idle(self, *modules: nn.Module | None) -> list[Tensor]:
        """With a shared optimizer: the parameters of ``modules`` (the network a step does not
        train), which get a zero gradient; else none."""
        if not self.shared_optimizer:
            return []
        return [p for m in modules if m is not None for p in m.parameters()]

    def _student_idle(self) -> list[Tensor]:
        return self._idle(self.teacher)

    def _catch_up(self) -> None:
        """replay='fresh' (the official ViT loop): ``S = I`` student steps on the second stream,
        over ``catch_up_passes(S, L)`` passes, each a new epoch of ``source.stream(1)``, against
        the current teacher in train mode."""
        steps = self.schedule.interval
        stream = self.source.stream(1)
        self._write("replay_start", teacher_step=self.teacher_steps, count=steps,
                    reason="interval", rule=self.schedule.condition)
        taken = 0
        with self._replay_teacher("interval") as teacher:
            for length in catch_up_passes(steps, self.steps_per_epoch):
                batches = stream.epoch(self._fresh_passes_done)
                self._fresh_passes_done += 1
                for _, (key, (x, y)) in zip(range(length), batches):
                    x = to_device(x, self.student_device)
                    y = to_device(y, self.student_device)
                    self._student_step(key, x, y, loss_fn=self._replay_loss(teacher),
                                       guard=self._replay_guard(teacher),
                                       teacher_step=self.teacher_steps, stream=1,
                                       what=", catching up on stream 1")
                    taken += 1
        self._write("replay_end", teacher_step=self.teacher_steps, count=taken,
                    reason="interval")

    def _replay(self, reason: str) -> None:
        if self.replay == "fresh" and reason == "interval":
            self._catch_up()
            return
        if not (self.overlap and reason == "interval"):
            super()._replay(reason)
            return
        records = self.replay_buffer.take()
        if not records:
            return
        self._issue_queued(len(self._queue))  # the previous interval must be fully issued
        if self._snapshot is None:
            self._snapshot = make_snapshot(self.teacher, self.student_device)
        self._lanes.publish_snapshot(self._snapshot, self.teacher)
        self._queue, self._queue_teacher_step = records, self.teacher_steps
        self._queue_count = len(records)
        self._write("replay_start", teacher_step=self.teacher_steps, count=len(records),
                    reason=reason, rule=self._replay_rule(reason))

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
