"""The table of training modes: what one batch does, and when recorded batches reach the student.

A mode is one :class:`Mode` entry; the distillers read its fields and hold no per-mode if-chain.
The official ``interval_rate`` convention (``0``: online / plain self KD, ``>= 50``: offline) is
part of the spaced entries (:func:`resolve_mode`). The trainer's CLI takes its name lists from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ops.names import FEATURE_LOSSES

OFFLINE_RATE = 50.0  # the official code's "interval_rate >= 50 means offline" threshold
# The paper's recommended space intervals s (epochs): online KD between two networks, and self KD
PAIR_INTERVAL_RATE = 1.5
SELF_INTERVAL_RATE = 4.0


@dataclass(frozen=True)
class Mode:
    """One training mode.

    - ``family``: ``pair`` (teacher and student networks) or ``self`` (one multi-exit network).
    - ``teacher``: a separate teacher network gives soft targets (``pair`` family only);
      ``frozen_teacher``: it does not train (a pretrained teacher; no teacher optimizer).
    - ``step``: what each batch does: ``student`` (student CE only), ``online`` (teacher CE step
      and student KD step on it), ``record`` (a CE step of the teacher, or of the deepest exit,
      recorded for a later replay), ``self-kd`` (the self-KD loss on it), ``frozen`` (a student
      KD step against the frozen teacher).
    - ``replays``: when recorded batches reach the student: ``interval`` (the spacing schedule),
      ``end`` (all of them after training, against the final teacher in eval mode), or ``None``.
    - ``at_rate_zero`` / ``at_offline_rate``: the mode that ``interval_rate == 0`` /
      ``>= OFFLINE_RATE`` selects instead (the official convention); ``None``: not applicable.
    """

    name: str
    family: str
    teacher: bool
    step: str
    replays: str | None
    at_rate_zero: str | None = None
    at_offline_rate: str | None = None
    frozen_teacher: bool = False


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("base", "pair", teacher=False, step="student", replays=None),
    Mode("online", "pair", teacher=True, step="online", replays=None),
    Mode("spaced", "pair", teacher=True, step="record", replays="interval",
         at_rate_zero="online", at_offline_rate="offline"),
    Mode("offline", "pair", teacher=True, step="record", replays="end"),
    Mode("frozen", "pair", teacher=True, step="frozen", replays=None, frozen_teacher=True),
    Mode("self", "self", teacher=False, step="self-kd", replays=None),
    Mode("spaced-self", "self", teacher=False, step="record", replays="interval",
         at_rate_zero="self"),
)}

MODE_NAMES = tuple(MODES)
TWO_MODEL_MODES = tuple(n for n, m in MODES.items() if m.family == "pair")
SELF_MODES = tuple(n for n, m in MODES.items() if m.family == "self")

__all__ = ["FEATURE_LOSSES", "MODES", "MODE_NAMES", "OFFLINE_RATE", "SELF_MODES",
           "TWO_MODEL_MODES", "Mode", "resolve_mode"]


def resolve_mode(mode: str, interval_rate: float, *, self_kd: bool = False) -> str:
    """The effective mode name, applying the official ``interval_rate`` convention.

    ``mode="spaced"`` with ``interval_rate == 0`` is ``online`` and with ``interval_rate >= 50``
    ``offline``; ``mode="spaced-self"`` with ``0`` is ``self`` (self KD has no offline form, so a
    rate >= 50 is an error there). Other modes ignore the rate. A negative rate is always an error.
    """
    allowed = SELF_MODES if self_kd else TWO_MODEL_MODES
    if mode not in allowed:
        raise ValueError(f"mode must be one of {allowed}, got {mode!r}")
    if interval_rate is None or not interval_rate >= 0:  # also rejects NaN
        raise ValueError(f"interval_rate must be >= 0, got {interval_rate!r}")
    spec = MODES[mode]
    if spec.replays != "interval":
        return mode
    if interval_rate == 0 and spec.at_rate_zero is not None:
        return spec.at_rate_zero
    if interval_rate >= OFFLINE_RATE:
        if spec.at_offline_rate is None:
            raise ValueError(f"interval_rate >= {OFFLINE_RATE:g} means offline KD, which "
                             f"mode {mode!r} does not have; use a rate below {OFFLINE_RATE:g}")
        return spec.at_offline_rate
    return mode
