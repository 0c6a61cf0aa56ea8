"""The books of a run: its epoch rows, the student's best accuracy, wall time, and where they go.

``RunHistory.record(row)`` is the one place an epoch row becomes visible: it is appended to the
rows the checkpoint keeps, to ``metrics.jsonl``/``metrics.csv`` and the optional loggers, printed as
one line, and when the student improves its weights are kept in ``best_student.pt``. Only rank 0
writes; every rank keeps the same rows.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..engine.model_io import unwrap
from .checkpoint import save_best_student
from .metric_names import test_key, upgrade
from .report import MetricsLog, row_text


class RunHistory:
    def __init__(self, parts, out: Path, *, stream: TextIO | None = None,
                 state: dict[str, Any] | None = None, loggers: Any = None) -> None:
        self.parts = parts
        self.out = out
        self.stream = stream or sys.stdout
        self.loggers = loggers
        self.rows: list[dict[str, Any]] = [upgrade(r) for r in (state or {}).get("metrics", [])]
        self.best: dict[str, Any] = dict((state or {}).get("best", {"top1": None, "epoch": None}))
        self.wall_before = float((state or {}).get("wall_s", 0.0))
        self.t_start = time.monotonic()
        self.is_main = parts.info.is_main
        self.metrics = MetricsLog(out, self.rows) if self.is_main else None

    def say(self, msg: str) -> None:
        if self.is_main:
            print(msg, file=self.stream, flush=True)

    def wall(self) -> float:
        """Seconds of training so far, over every session of this run."""
        return self.wall_before + time.monotonic() - self.t_start

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        top1 = row.get(test_key("student"))
        if top1 is not None and (self.best["top1"] is None or top1 > self.best["top1"]):
            self.best = {"top1": top1, "epoch": row["epoch"]}
            if self.is_main:
                p = self.parts
                save_best_student(self.out, state_dict=unwrap(p.student).state_dict(),
                                  arch=p.student_arch, num_classes=p.data.num_classes,
                                  image_size=p.data.image_size, epoch=row["epoch"], top1=top1)
        if self.is_main:
            self.metrics.append(row)
            if self.loggers is not None:
                self.loggers.log(row)
            self.say(row_text(row, self.parts.cfg, has_teacher=self.parts.teacher is not None))
