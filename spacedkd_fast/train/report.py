"""What a run shows and leaves behind: progress bar, metrics files, curves, summary table.

Nothing here reads a tensor: the trainer hands over plain floats it has already brought to the host
(once per ``log_every`` steps), so reporting never adds a device synchronisation.

Files in the output folder: ``metrics.jsonl`` (one JSON object per epoch), ``metrics.csv`` (the
same rows without the old names, accuracies in percent: :func:`.metric_names.csv_row`),
``summary.txt`` (the final table); ``curves.png`` is drawn by :mod:`.curves`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from .metric_names import csv_name, csv_row, test_key, upgrade

# Fields whose columns lead metrics.csv (named by csv_name); any further keys follow in
# first-seen order.
LEADING_COLUMNS = ("epoch", "trained", "test_teacher_top1", "test_teacher_top5",
                   "test_student_top1", "test_student_top5", "train_teacher_loss",
                   "train_student_loss", "train_ce", "train_kl", "train_feat", "lr",
                   "student_lr", "images_per_s", "wall_s")
# Keys that depend on the clock, not on the computation (left out when comparing runs).
TIMING_KEYS = ("images_per_s", "wall_s", "epoch_s")


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """One epoch's progress: steps, images/s, loss parts, learning rate, ETA.

    On a terminal the bar redraws in place (at most 5 times a second). Elsewhere (a log file, CI)
    it prints a plain line each time new loss values arrive, so logs stay readable.
    """

    def __init__(self, total: int, title: str, *, stream: TextIO | None = None,
                 enabled: bool = True, width: int = 24,
                 labels: dict[str, str] | None = None) -> None:
        self.total = max(int(total), 1)
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.done = 0
        self.images = 0
        self.stats: dict[str, float] = {}
        self.lr: float | None = None
        self.labels = dict(labels or {})  # stats key -> the word shown (loss_labels)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0

    def _text(self) -> str:
        frac = min(self.done / self.total, 1.0)
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        parts = [f"{self.title} {self.done:>{len(str(self.total))}}/{self.total}"]
        if self.tty:
            fill = int(round(frac * self.width))
            parts.insert(1, "[" + "#" * fill + "." * (self.width - fill) + "]")
        parts.append(f"{self.rate():7.1f} img/s")
        for key, value in self.stats.items():
            if value is not None and math.isfinite(value):
                parts.append(f"{self.labels.get(key, key)} {value:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3g}")
        parts.append(f"eta {_fmt_duration(eta)}")
        return "  ".join(parts)

    def update(self, done: int, images: int, *, stats: dict[str, float] | None = None,
               lr: float | None = None) -> None:
        """Record progress; ``stats`` (fresh loss means) makes a plain-text log print a line."""
        self.done, self.images = done, images
        if stats:  # keep the last value of a part that this read did not update
            self.stats.update({k: v for k, v in stats.items() if v is not None})
        if lr is not None:
            self.lr = lr
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            if now - self.last_draw >= 0.2 or done >= self.total:
                self.stream.write("\r\033[K" + self._text())
                self.stream.flush()
                self.last_draw = now
        elif stats:
            self.stream.write(self._text() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K" + self._text() + "\n")
            self.stream.flush()


class MetricsLog:
    """``metrics.jsonl`` and ``metrics.csv`` of a run; rows are plain dicts of numbers."""

    def __init__(self, out_dir: str | Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.jsonl = self.out_dir / "metrics.jsonl"
        self.csv = self.out_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        # A resumed run rewrites both files from the checkpoint's history: lines written after
        # that checkpoint by the killed run would otherwise appear twice.
        self.jsonl.write_text("")
        for row in rows or []:
            self.append(row)
        if not rows:
            self._write_csv()

    def append(self, row: dict[str, Any]) -> None:
        row = {k: _json_safe(v) for k, v in row.items()}
        self.rows.append(row)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_csv()

    def _write_csv(self) -> None:
        rows = [csv_row(r) for r in self.rows]
        leading = [csv_name(c) for c in LEADING_COLUMNS]
        columns = [c for c in leading if any(c in r for r in rows)]
        for row in rows:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
        tmp = self.csv.with_suffix(".csv.tmp")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.csv)


def _json_safe(value: Any) -> Any:
    """NaN/inf become None so that every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``path`` is the file or the run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [upgrade(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _best(rows: list[dict[str, Any]], key: str) -> tuple[float | None, int | None]:
    values = [(r[key], r["epoch"]) for r in rows if r.get(key) is not None]
    if not values:
        return None, None
    return max(values)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:6.2f}%"


def summary_table(rows: list[dict[str, Any]], *, wall_s: float, images_per_s: float,
                  models: list[tuple[str, str]], compare: list[dict[str, Any]] | None = None,
                  compare_name: str = "comparison", heading: list[str] | None = None) -> str:
    """The end-of-run table: best and final test top-1/top-5 per model, gain, time, throughput.

    ``models`` pairs a display name with the model's metrics name (``("student", "student")``
    reads ``test_student_top1``); ``heading``: lines printed above the table.
    """
    rows = [upgrade(r) for r in rows]
    compare = [upgrade(r) for r in compare] if compare else compare
    head = list(heading or [])
    lines = [f"{'model':<22}{'best top-1':>12}{'(epoch)':>9}{'final top-1':>13}{'final top-5':>13}"]
    lines.append("-" * len(lines[0]))
    last = rows[-1] if rows else {}
    for name, prefix in models:
        best, at = _best(rows, test_key(prefix))
        lines.append(f"{name:<22}{_pct(best):>12}{'' if at is None else at:>9}"
                     f"{_pct(last.get(test_key(prefix))):>13}"
                     f"{_pct(last.get(test_key(prefix, 'top5'))):>13}")
    if compare:
        ours, _ = _best(rows, test_key("student"))
        theirs, _ = _best(compare, test_key("student"))
        if ours is not None and theirs is not None:
            lines.append(f"student best top-1 vs {compare_name}: {_pct(theirs).strip()} -> "
                         f"{_pct(ours).strip()} (gain {100 * (ours - theirs):+.2f} points)")
    note = untrained_text(rows)
    if note:
        lines.append(f"note: {note}")
    lines.append(f"wall time {_fmt_duration(wall_s)} ({wall_s:.1f} s), "
                 f"{images_per_s:.1f} training images/s")
    return "\n".join(head + ([""] if head else []) + lines)


class ExternalLoggers:
    """Optional TensorBoard / Weights & Biases mirrors of the epoch rows (rank 0 only).

    Both are optional dependencies: asking for one that is not installed raises ``ImportError`` with
    the install command at start, never a prompt. W&B runs offline unless an API key is configured.
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool, wandb: bool,
                 project: str, config: dict[str, Any], run_name: str) -> None:
        self.tb = None
        self.wandb_run = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("--tensorboard needs the tensorboard package: "
                                  "pip install tensorboard") from None
            self.tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_mod
            except ImportError:
                raise ImportError("--wandb needs the wandb package: pip install wandb") from None
            has_key = bool(os.environ.get("WANDB_API_KEY"))
            if not has_key:
                try:
                    has_key = bool(wandb_mod.api.api_key)
                except Exception:  # noqa: BLE001 - any failure means: no usable key
                    has_key = False
            mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
            self.wandb_run = wandb_mod.init(project=project, name=run_name, config=config,
                                            dir=str(out_dir), mode=mode, reinit=True)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["epoch"])
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "epoch"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


# ------------------------------------------------------------------------------ run text
def _pct_cell(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.2f}%"


def untrained_epochs(rows: list[dict[str, Any]]) -> list[int]:
    """Epochs after which the student had taken no training step yet: spaced KD before its
    first replay, offline KD's teacher epochs, spaced self KD before its first self-KD replay
    (the shallow exits then have their initial weights). Its accuracy there is its initial one."""
    return [r["epoch"] for r in rows if r.get("student_steps") == 0]


def _is_self(rows: list[dict[str, Any]]) -> bool:
    return any(r.get(test_key("exit1")) is not None for r in rows)


def untrained_text(rows: list[dict[str, Any]]) -> str | None:
    """The sentence that says which epochs show the student's initial accuracy (``None``: none)."""
    epochs = untrained_epochs(rows)
    if not epochs:
        return None
    span = f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}-{epochs[-1]}"
    if _is_self(rows):
        return (f"at {span} the shallow exits had their initial weights (no self-KD replay yet; "
                "the deepest exit trained on CE alone), so their accuracy there is their "
                "initial one")
    if any(r.get("trained") == "student" for r in rows):
        why = "it trains after the teacher"
    elif len(epochs) == len(rows):
        why = "no replay in this run"
    else:
        why = "its first replay came later"
    return (f"at {span} the student had taken no training step ({why}), so its accuracy there "
            "is that of its initial weights")


def _pct_cell(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.2f}%"


def _parts_text(row: dict[str, Any], beta: float) -> str:
    """``[CE 1.23, KD 0.45, feature 0.03 x 167.10]``: the student loss's parts (epoch means);
    the feature term is shown with its weight, as it often dominates the total."""
    parts = [f"{label} {row[key]:.4f}" for label, key in (("CE", "train_ce"), ("KD", "train_kl"))
             if row.get(key) is not None]
    if row.get("train_feat") is not None:
        parts.append(f"feature {beta:g} x {row['train_feat']:.2f}")
    return f" [{', '.join(parts)}]" if parts else ""


def loss_labels(cfg: Any) -> dict[str, str]:
    """Words for the engine's loss means (progress bar, epoch line): in self KD the "teacher"
    loss is the deepest exit's CE-only steps and the "student" loss the self-KD steps."""
    if cfg.is_self:
        return {"teacher_loss": "deepest-exit CE", "student_loss": "self-KD", "ce": "CE",
                "kl": "KD", "feat": "feature"}
    return {"teacher_loss": "teacher", "student_loss": "student", "ce": "CE", "kl": "KD",
            "feat": "feature"}


def row_text(row: dict[str, Any], cfg: Any, *, has_teacher: bool) -> str:
    """The one line printed per epoch row (``cfg``: the run's ``TrainConfig``)."""
    total = cfg.epochs * (2 if cfg.mode == "offline" else 1)
    untrained = row.get("student_steps") == 0 and (has_teacher or cfg.is_self)
    parts = [f"epoch {row['epoch']:>3}/{total}"]
    if cfg.mode == "offline":
        parts.append(f"[{row['trained']}]")
    if cfg.is_self:
        exits = " ".join(_pct_cell(row.get(test_key(f"exit{i}"))).strip()
                         for i in range(1, 9) if row.get(test_key(f"exit{i}")) is not None)
        parts.append(f"exits top-1 {exits}  ensemble top-1 "
                     f"{_pct_cell(row[test_key('student')])} "
                     f"top-5 {_pct_cell(row[test_key('student', 'top5')])}"
                     + (" (shallow exits: initial weights, no replay yet)" if untrained else ""))
    else:
        if has_teacher:
            parts.append(f"teacher top-1 {_pct_cell(row[test_key('teacher')])} top-5 "
                         f"{_pct_cell(row[test_key('teacher', 'top5')])}")
        parts.append(f"student top-1 {_pct_cell(row[test_key('student')])} top-5 "
                     f"{_pct_cell(row[test_key('student', 'top5')])}"
                     + (" (initial weights: not trained yet)" if untrained else ""))
    words = loss_labels(cfg)
    losses = [f"{words['teacher_loss']} {row['train_teacher_loss']:.4f}"
              ] if row.get("train_teacher_loss") is not None else []
    if row.get("train_student_loss") is not None:
        losses.append(f"{words['student_loss']} {row['train_student_loss']:.4f}"
                      + _parts_text(row, cfg.beta))
    if losses:
        parts.append("loss " + " ".join(losses))
    parts.append(f"lr {row['lr']:.3g}")
    if row.get("images_per_s"):
        parts.append(f"{row['images_per_s']:.0f} img/s")
    parts.append(f"{row['epoch_s']:.1f} s")
    return "  ".join(parts)


def spacing_warning(cfg: Any, schedule: Any, *, steps_per_epoch: int,
                    flush_tail: bool) -> str | None:
    """A warning for the start of a spaced run whose first replay (``schedule.first_replay_at``)
    falls after its last step: the student would learn only from the end-of-run replay, or not
    at all without ``flush_tail``. ``None`` otherwise (or without a schedule)."""
    first = getattr(schedule, "first_replay_at", None)
    total = cfg.epochs * steps_per_epoch
    if first is None or first <= total:
        return None
    who, verb = ("the shallow exits", "learn") if cfg.is_self else ("the student", "trains")
    what = (f"{who} {verb} only in the end-of-run replay of all {total} batches" if flush_tail
            else f"the tail is dropped (--no-flush-tail), so {who} never {verb}")
    return (f"warning: the spacing interval (s={cfg.interval_rate:g}, first replay after step "
            f"{first}) is longer than this run ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
            f" of {steps_per_epoch} steps = {total} steps): {what}. Use a smaller "
            "--interval-rate or more --epochs.")


def models_text(cfg: Any, names_and_sizes: list[tuple[str, str]]) -> str:
    """``teacher resnet18 (11.2M) -> student resnet18 (11.2M)``, ``model ...`` or ``network ...``."""
    if cfg.is_self:
        return "network {} ({})".format(*names_and_sizes[0])
    if len(names_and_sizes) == 1:
        return "model {} ({})".format(*names_and_sizes[0])
    (t, tn), (s, sn) = names_and_sizes
    return f"teacher {t} ({tn}) -> student {s} ({sn})"


def run_header(cfg: Any, *, models: str, num_classes: int, image_size: int,
               steps_per_epoch: int) -> str:
    """The line that says what the run trains: mode, spacing, models, data shape, optimiser."""
    spacing = ""
    if cfg.mode in ("spaced", "spaced-self"):
        spacing = (f", s={cfg.interval_rate:g} (replay every "
                   f"{int(steps_per_epoch * cfg.interval_rate)} steps)")
    return (f"mode {cfg.mode}{spacing}; {models}; {num_classes} classes, {image_size} px; "
            f"{steps_per_epoch} steps/epoch x {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}, "
            f"batch {cfg.batch_size}, "
            f"{cfg.optimizer} lr {cfg.lr:g} ({cfg.schedule})")


def nonfinite_text(err: Any, *, steps_per_epoch: int, last_epoch: int, checkpoint: Path,
                   amp: str = "off") -> str:
    """The stop message of a run whose loss became NaN/inf (``err``: a ``NonFiniteLossError``);
    ``amp``: the run's autocast (``--amp off`` is suggested only when it was on)."""
    kept = (f"the last good checkpoint (after epoch {last_epoch}) is kept in {checkpoint}"
            if last_epoch else "no checkpoint had been written yet")
    where = f"batch key {err.key}"
    if isinstance(err.key, int):
        L = steps_per_epoch
        where = (f"step n={err.key}: epoch {(err.key - 1) // L + 1}, batch "
                 f"{(err.key - 1) % L + 1} of {L}")
    return (f"stopped: non-finite {err.role} loss at {where} ({err.role} update {err.step} was "
            f"not applied); {kept}. Lower --lr, {'try --amp off, ' if amp != 'off' else ''}"
            "or check the data.")


def summary_models(cfg: Any, *, has_teacher: bool, last_row: dict[str, Any]
                   ) -> list[tuple[str, str]]:
    """``(display name, metrics prefix)`` of the models the summary table lists."""
    if cfg.is_self:
        models = [(f"exit {i}", f"exit{i}") for i in range(1, 9)
                  if last_row.get(test_key(f"exit{i}")) is not None]
        return models + [("ensemble (student)", "student")]
    if not has_teacher:
        return [("model", "student")]
    return [("teacher", "teacher"), ("student", "student")]
