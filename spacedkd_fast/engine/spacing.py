"""When the teacher trains and when the student replays: pure arithmetic on step numbers.

No torch here, so a schedule can be checked in microseconds. Terms (SPEC section 1): ``L`` batches
per epoch, ``s`` the space interval in epochs, ``I = int(L * s)`` the interval in steps, ``n`` the
global step counter (1 for the first training batch).

Which mode an ``interval_rate`` selects is the mode table's business (:mod:`.modes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FIRST_REPLAY_RULES = {
    "interval": "n % I == 0",  # ours: replays at n = I, 2I, ...
    "one-epoch": "n >= L and (n - L) % I == 0",  # the official self-KD counter, I >= L only
    "official": "(n - L) % I == 0",  # the official self-KD counter with Python modulo, any I
    "vit": "space_counter >= L * s",  # the official ViT loop: I = ceil(L * s), counter carried
}
"""Replay rules of a spaced schedule: name -> the condition on ``n`` (as the trace shows it)."""


def catch_up_passes(steps: int, steps_per_epoch: int) -> list[int]:
    """Student steps per pass of the official ViT catch-up of ``S = steps`` steps: up to
    ``floor(S / L) + 1`` passes over the second loader, each a fresh shuffle, leaving a pass once
    ``S`` steps are done; as the ``break`` leaves only the inner loop, every pass after the one
    that reaches ``S`` still takes one step (``S = L``: ``[L, 1]``; ``S = 1.5 L``: ``[L, L/2]``).
    """
    lengths, done = [], 0
    for _ in range(steps // steps_per_epoch + 1):
        take = min(steps_per_epoch, steps - done) if done < steps else 1
        lengths.append(take)
        done += take
    return lengths


def smallest_rate(steps_per_epoch: int) -> float:
    """The smallest ``interval_rate`` whose interval ``int(L * s)`` is one step, rounded up to
    six decimals (a value the user can type)."""
    s = math.ceil(1e6 / steps_per_epoch) / 1e6
    while int(steps_per_epoch * s) < 1:  # float rounding of L * s
        s += 1e-6
    return s


def interval_steps(steps_per_epoch: int, interval_rate: float) -> int:
    """``I = int(L * s)``, the space interval in steps (the official truncation).

    Raises ``ValueError`` for ``L < 1``, ``s <= 0`` or an interval that truncates to zero steps.
    """
    if int(steps_per_epoch) != steps_per_epoch or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
    if not interval_rate > 0:
        raise ValueError(f"a spaced interval needs interval_rate > 0, got {interval_rate!r}")
    steps = int(steps_per_epoch * interval_rate)
    if steps < 1:
        raise ValueError(
            f"interval_rate={interval_rate} with steps_per_epoch={steps_per_epoch} gives an "
            f"interval of int({steps_per_epoch} * {interval_rate}) = 0 steps; the smallest "
            f"valid interval_rate is 1/{steps_per_epoch} (use >= {smallest_rate(steps_per_epoch)})"
            " or interval_rate=0 for online KD")
    return steps


@dataclass(frozen=True)
class SpacedSchedule:
    """Replay points of a spaced mode.

    ``first_replay_at``: the step of the first replay; replays follow every ``I`` steps
    (:data:`FIRST_REPLAY_RULES`). ``interval`` (SPEC rule 4): ours, ``n = I, 2I, ...``.
    ``official``: the official self-KD counter ``n_iter = n - L`` fires when ``n_iter % I == 0``
    with Python's modulo, so at every ``n >= 1`` with ``n = L (mod I)``: inside the first epoch
    when ``I < L`` (``L = 391``, ``I = 195``: ``n = 1, 196, 391, ...``), ``n = L, L + I, ...``
    otherwise. ``one-epoch``: the same from ``n = L`` on (equal to ``official`` when ``I >= L``).
    """

    steps_per_epoch: int
    interval: int
    first_replay_at: int
    rule: str = "interval"

    @classmethod
    def build(cls, steps_per_epoch: int, interval_rate: float,
              first_replay: str = "interval") -> SpacedSchedule:
        if first_replay == "vit":
            # a counter of teacher steps, carried across epochs and reset by each catch-up, fires
            # at counter >= L * s (a float): every ceil(L * s) steps, at least every step
            interval_steps(steps_per_epoch, 1.0)  # checks L
            if not interval_rate > 0:
                raise ValueError(f"a spaced interval needs interval_rate > 0, got "
                                 f"{interval_rate!r}")
            interval = max(1, math.ceil(steps_per_epoch * interval_rate))
            return cls(steps_per_epoch, interval, interval, first_replay)
        interval = interval_steps(steps_per_epoch, interval_rate)
        if first_replay == "interval":
            first = interval
        elif first_replay == "one-epoch":
            first = steps_per_epoch
        elif first_replay == "official":
            first = steps_per_epoch % interval or interval  # the smallest n >= 1 with n = L mod I
        else:
            raise ValueError(f"first_replay must be one of {tuple(FIRST_REPLAY_RULES)}, got "
                             f"{first_replay!r}")
        return cls(steps_per_epoch, interval, first, first_replay)

    @property
    def condition(self) -> str:
        """The rule that fires a replay, as written in :data:`FIRST_REPLAY_RULES`."""
        return FIRST_REPLAY_RULES[self.rule]

    def replay_due(self, n: int) -> bool:
        """True when the student replays right after teacher step ``n`` (``n >= 1``)."""
        return n >= self.first_replay_at and (n - self.first_replay_at) % self.interval == 0

    def epoch_of(self, n: int) -> int:
        """0-based epoch of global step ``n``."""
        return (n - 1) // self.steps_per_epoch

    def plan(self, total_steps: int, flush_tail: bool = True) -> list[tuple[int, list[int]]]:
        """``[(after_step, [steps replayed in order]), ...]`` for a run of ``total_steps``.

        The final entry, at ``after_step = total_steps``, holds the tail that ``finish()`` replays
        (omitted when ``flush_tail`` is false or there is no tail).
        """
        out: list[tuple[int, list[int]]] = []
        pending: list[int] = []
        for n in range(1, total_steps + 1):
            pending.append(n)
            if self.replay_due(n):
                out.append((n, pending))
                pending = []
        if pending and flush_tail:
            out.append((total_steps, pending))
        return out
