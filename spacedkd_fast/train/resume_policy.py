"""When a run writes checkpoints within an epoch (``--checkpoint-every``), and which settings a
resume may change. Torch-free: the configuration validates these values before torch loads.

``--checkpoint-every`` takes ``epoch`` (the default: a checkpoint at each epoch end only), a number
of steps (``500``: also after every global step that is a multiple of 500) or a duration (``10m``,
``90s``, ``1h``: also at the first log point after that much time since the last checkpoint). Step
checkpoints fall on the same steps in every run of the configuration; time checkpoints are decided
at the log points (``--log-every``), where the ranks of a multi-process run already agree on
stopping, so that every rank saves at the same step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EPOCH_ONLY = "epoch"
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^(\d+(?:\.\d*)?)\s*([smh])$")

# Settings a resume may change: they do not change what is computed (``epochs`` may also grow; a
# resume extends the run then). ``checkpoint_every`` only adds checkpoints.
RESUME_SAFE = frozenset({"tensorboard", "wandb", "wandb_project", "log_every", "compare",
                         "checkpoint_every"})


@dataclass(frozen=True)
class CheckpointEvery:
    """``steps``: every that many global steps; ``seconds``: at least that long apart."""

    steps: int | None = None
    seconds: float | None = None

    @property
    def within_epochs(self) -> bool:
        return self.steps is not None or self.seconds is not None


def parse_checkpoint_every(text: str) -> CheckpointEvery:
    """``"epoch"`` / ``"500"`` / ``"10m"`` -> :class:`CheckpointEvery`; ``ValueError`` otherwise
    (the message is the one line the user sees)."""
    value = str(text).strip().lower()
    if value == EPOCH_ONLY:
        return CheckpointEvery()
    if value.isdigit():
        steps = int(value)
        if steps <= 0:
            raise ValueError(f"checkpoint_every={text!r}: the number of steps must be positive")
        return CheckpointEvery(steps=steps)
    match = _PATTERN.match(value)
    if match is None:
        raise ValueError(f"checkpoint_every={text!r} is not 'epoch', a number of steps (500) or "
                         "a duration (90s, 10m, 1h)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"checkpoint_every={text!r}: the duration must be positive")
    return CheckpointEvery(seconds=seconds)


def checkpoint_every_errors(cfg) -> list[str]:
    """The configuration's message for a ``checkpoint_every`` it cannot use (empty: fine)."""
    try:
        parse_checkpoint_every(cfg.checkpoint_every)
    except ValueError as err:
        return [str(err)]
    return []
