"""Learning-rate schedules: constant, multistep or cosine, with linear warm-up, evaluated per
optimiser step (:class:`StepSchedule`) or per epoch like timm's schedulers in the official ViT code
(:class:`EpochSchedule`). :func:`build_schedule` picks one from a ``TrainConfig``.

Stepping per optimiser step, not per epoch, keeps each model on its own clock: in spaced KD the
student's steps lag the teacher's by up to one interval, and in offline KD the student starts after
the teacher has finished, yet each sees the schedule at its own progress. The engine calls
``step()`` after every optimiser step of the model the schedule belongs to.

Unlike ``torch.optim.lr_scheduler``, the rate is written to *every* param group present at each
step, so a group added after construction (the student's projection head) follows the schedule.
A tensor rate (the optimizers of ``cuda_graphs``, whose captured step reads it) is written in place.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any

import torch


class _ParamGroupSchedule:
    """What both schedules share: the current rate written into every param group, one ``step()``
    per optimiser step (``t`` counts them)."""

    optimizer: torch.optim.Optimizer
    t: int

    def current_lr(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _apply(self) -> None:
        lr = self._last_lr = self.current_lr()
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                # a tensor rate (cuda_graphs) is read by a captured optimizer step: write in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def step(self) -> None:
        self.t += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The rate of each param group (host floats: no device read for a tensor rate)."""
        return [self._last_lr if isinstance(g["lr"], torch.Tensor) else g["lr"]
                for g in self.optimizer.param_groups]


class StepSchedule(_ParamGroupSchedule):
    """``lr(t)`` for ``t`` completed optimiser steps, written into ``optimizer``'s param groups.

    - warm-up: ``lr = peak * (t + 1) / warmup_steps`` for ``t < warmup_steps``, or, with
      ``warmup_start_lr`` given, linear from it: ``start + (peak - start) * t / warmup_steps``;
    - ``constant``: ``peak``; ``multistep``: ``peak * gamma ** (milestones passed)``;
    - ``cosine``: from ``peak`` after warm-up down to ``min_lr`` at ``total_steps``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, peak_lr: float,
                 total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 milestones: list[int] | None = None, gamma: float = 0.1,
                 warmup_start_lr: float | None = None) -> None:
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
        self.warmup_start_lr = None if warmup_start_lr is None else float(warmup_start_lr)
        self.t = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        if t < self.warmup_steps:
            if self.warmup_start_lr is not None:
                start = self.warmup_start_lr
                return start + (self.peak_lr - start) * t / self.warmup_steps
            return self.peak_lr * (t + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        if self.kind == "multistep":
            return self.peak_lr * self.gamma ** bisect_right(self.milestones, t)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((t - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def current_lr(self) -> float:
        return self.lr_at(self.t)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        self._apply()


class EpochSchedule(_ParamGroupSchedule):
    """The rate of timm's schedulers stepped once per epoch, as the official ViT code uses them.

    For epoch ``e`` (0 first), ``W`` warm-up epochs, ``E`` epochs in all, ``peak`` the base rate:

    - warm-up (``e < W``): ``start + e * (peak - start) / W`` (``start = warmup_start_lr``, 0 if
      None; the official code starts at ``0.001 * peak``);
    - ``cosine`` (timm ``CosineLRScheduler``, ``warmup_prefix=False``: the cosine runs over all
      ``E`` epochs, so it is already at ``W / E`` when warm-up ends):
      ``min_lr + (peak - min_lr) * (1 + cos(pi * e / E)) / 2``, and ``min_lr`` from ``e = E`` on;
    - ``constant``: ``peak``; ``multistep``: ``peak * gamma ** (milestones <= e)``.

    The rate is constant within an epoch. The epoch is the one given to :meth:`set_epoch` (the
    official clock: every optimiser step of main-loop epoch ``e``, the teacher's and the spaced
    student's catch-up steps alike, uses ``lr(e)``); until ``set_epoch`` is called it is this
    optimiser's own step count divided by ``steps_per_epoch``. ``step()`` is called after every
    optimiser step, as for :class:`StepSchedule`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, kind: str, peak_lr: float, epochs: int,
                 steps_per_epoch: int, warmup_epochs: int = 0, warmup_start_lr: float | None = None,
                 min_lr: float = 0.0, milestones: list[int] | None = None,
                 gamma: float = 0.1) -> None:
        if kind not in ("constant", "multistep", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}; choose constant, multistep or cosine")
        if epochs < 1 or steps_per_epoch < 1 or warmup_epochs < 0:
            raise ValueError(f"need epochs >= 1, steps_per_epoch >= 1 and warmup_epochs >= 0, got "
                             f"{epochs}, {steps_per_epoch}, {warmup_epochs}")
        if int(warmup_epochs) != warmup_epochs:
            raise ValueError(f"a per-epoch warm-up needs a whole number of epochs, got {warmup_epochs}")
        self.optimizer = optimizer
        self.kind, self.peak_lr, self.min_lr = kind, float(peak_lr), float(min_lr)
        self.epochs, self.steps_per_epoch = int(epochs), int(steps_per_epoch)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_start_lr = 0.0 if warmup_start_lr is None else float(warmup_start_lr)
        self.milestones = sorted(int(m) for m in (milestones or []))
        self.gamma = float(gamma)
        self.t = 0
        self.pinned_epoch: int | None = None
        self._apply()

    @property
    def epoch(self) -> int:
        return self.pinned_epoch if self.pinned_epoch is not None else self.t // self.steps_per_epoch

    def lr_at_epoch(self, e: int) -> float:
        if e < self.warmup_epochs:
            return self.warmup_start_lr + e * (self.peak_lr - self.warmup_start_lr) / self.warmup_epochs
        if self.kind == "constant":
            return self.peak_lr
        if self.kind == "multistep":
            return self.peak_lr * self.gamma ** bisect_right(self.milestones, e)
        if e >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * e / self.epochs))

    def current_lr(self) -> float:
        return self.lr_at_epoch(self.epoch)

    def set_epoch(self, epoch: int | None) -> None:
        """Follow the main loop's epoch from now on (see the class docstring); ``None`` returns
        to this optimiser's own step count (e.g. for an offline student trained after the
        teacher)."""
        self.pinned_epoch = None if epoch is None else int(epoch)
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "epoch": self.pinned_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state["t"])
        epoch = state.get("epoch")
        self.pinned_epoch = None if epoch is None else int(epoch)
        self._apply()


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Any,
                   steps_per_epoch: int) -> StepSchedule | EpochSchedule:
    """The schedule ``cfg`` asks for (``warmup_per`` ``step`` or ``epoch``), over ``optimizer``.

    ``cfg``: a ``TrainConfig`` (reads ``schedule``, ``lr``, ``epochs``, ``warmup_epochs``,
    ``warmup_per``, ``warmup_start_factor``, ``min_lr``, ``milestones``, ``gamma``);
    ``steps_per_epoch``: optimiser steps of one epoch of this model (``L``).
    """
    factor = getattr(cfg, "warmup_start_factor", None)
    start = None if factor is None else factor * cfg.lr
    if getattr(cfg, "warmup_per", "step") == "epoch":
        return EpochSchedule(optimizer, kind=cfg.schedule, peak_lr=cfg.lr, epochs=cfg.epochs,
                             steps_per_epoch=steps_per_epoch, warmup_epochs=cfg.warmup_epochs,
                             warmup_start_lr=start, min_lr=cfg.min_lr,
                             milestones=[int(round(m)) for m in cfg.milestones], gamma=cfg.gamma)
    return StepSchedule(optimizer, kind=cfg.schedule, peak_lr=cfg.lr,
                        total_steps=cfg.epochs * steps_per_epoch,
                        warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
                        min_lr=cfg.min_lr,
                        milestones=[int(round(m * steps_per_epoch)) for m in cfg.milestones],
                        gamma=cfg.gamma, warmup_start_lr=start)
