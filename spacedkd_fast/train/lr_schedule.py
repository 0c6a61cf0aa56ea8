"""Learning-rate schedules stepped once per optimiser step (constant, multistep, cosine, warm-up).

Stepping per optimiser step, not per epoch, keeps each model on its own clock: in spaced KD the
student's steps lag the teacher's by up to one interval, and in offline KD the student starts after
the teacher has finished, yet each sees the schedule at its own progress. The engine calls
``step()`` after every optimiser step of the model the schedule belongs to.

Unlike ``torch.optim.lr_scheduler``, the rate is written to *every* param group present at each
step, so a group added after construction (the student's projection head) follows the schedule.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any

import torch


class StepSchedule:
    """``lr(t)`` for ``t`` completed optimiser steps, written into ``optimizer``'s param groups.

    - warm-up: ``lr = peak * (t + 1) / warmup_steps`` for ``t < warmup_steps``;
    - ``constant``: ``peak``; ``multistep``: ``peak * gamma ** (milestones passed)``;
    - ``cosine``: from ``peak`` after warm-up down to ``min_lr`` at ``total_steps``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, peak_lr: float,
                 total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 milestones: list[int] | None = None, gamma: float = 0.1) -> None:
        if kind not in ("constant", "multistep", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}; choose constant, multistep or cosine")
        if total_steps < 1 or warmup_steps < 0:
            raise ValueError(f"need total_steps >= 1 and warmup_steps >= 0, got {total_steps}, "
                             f"{warmup_steps}")
        self.optimizer = optimizer
        self.kind, self.peak_lr, self.min_lr = kind, float(peak_lr), float(min_lr)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.milestones = sorted(int(m) for m in (milestones or []))
        self.gamma = float(gamma)
        self.t = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            return self.peak_lr * (t + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        if self.kind == "multistep":
            return self.peak_lr * self.gamma ** bisect_right(self.milestones, t)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((t - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        lr = self.lr_at(self.t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.t += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self._apply()
