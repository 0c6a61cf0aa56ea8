"""When the teacher trains and when the student replays: pure arithmetic on step numbers.

No torch here, so a schedule can be checked in microseconds. Terms (SPEC section 1): ``L`` batches
per epoch, ``s`` the space interval in epochs, ``I = int(L * s)`` the interval in steps, ``n`` the
global step counter (1 for the first training batch).

The official code selects the mode from ``interval_rate`` alone: ``0`` means online (or plain self
KD), ``>= 50`` means offline, anything else spaced. :func:`resolve_mode` accepts that convention.
"""

from __future__ import annotations

from dataclasses import dataclass

TWO_MODEL_MODES = ("base", "online", "spaced", "offline")
SELF_MODES = ("self", "spaced-self")
OFFLINE_RATE = 50.0  # the official code's "interval_rate >= 50 means offline" threshold


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
            f"interval of int({steps_per_epoch} * {interval_rate}) = 0 steps; use a larger rate"
        )
    return steps


def resolve_mode(mode: str, interval_rate: float, *, self_kd: bool = False) -> str:
    """The effective mode, applying the official ``interval_rate`` convention to spaced modes.

    ``mode="spaced"`` with ``interval_rate == 0`` is ``online`` and with ``interval_rate >= 50``
    ``offline``; ``mode="spaced-self"`` with ``0`` is ``self`` (self KD has no offline form, so a
    rate >= 50 is an error there). Other modes ignore the rate. A negative rate is always an error.
    """
    allowed = SELF_MODES if self_kd else TWO_MODEL_MODES
    if mode not in allowed:
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}")
    if interval_rate is None or not interval_rate >= 0:  # also rejects NaN
        raise ValueError(f"interval_rate must be >= 0, got {interval_rate!r}")
    if mode == "spaced":
        if interval_rate == 0:
            return "online"
        if interval_rate >= OFFLINE_RATE:
            return "offline"
    if mode == "spaced-self":
        if interval_rate == 0:
            return "self"
        if interval_rate >= OFFLINE_RATE:
            raise ValueError(
                f"interval_rate >= {OFFLINE_RATE:g} means offline KD, which self KD does not have"
            )
    return mode


@dataclass(frozen=True)
class SpacedSchedule:
    """Replay points of a spaced mode.

    ``first_replay_at``: the step of the first replay. ``interval`` (SPEC rule 4): ours replays at
    ``n = I, 2I, ...``. ``one-epoch`` reproduces the official self-KD counter, which starts at
    ``-L + 1`` and so replays at ``n = L, L + I, L + 2I, ...`` (we assume, as happens for the
    official ``s = 4``, that negative counter values never trigger a replay).
    """

    steps_per_epoch: int
    interval: int
    first_replay_at: int

    @classmethod
    def build(cls, steps_per_epoch: int, interval_rate: float,
              first_replay: str = "interval") -> SpacedSchedule:
        interval = interval_steps(steps_per_epoch, interval_rate)
        if first_replay == "interval":
            first = interval
        elif first_replay == "one-epoch":
            first = steps_per_epoch
        else:
            raise ValueError(f"first_replay must be 'interval' or 'one-epoch', got {first_replay!r}")
        return cls(steps_per_epoch, interval, first)

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
