"""Names of the per-epoch metrics: ``test_*`` for accuracies on the test set, ``train_*`` for
means of training losses over the epoch.

Rows written by this version to ``metrics.jsonl`` also carry the names of earlier versions
(``teacher_top1``, ``student_loss``, ``ce``, ``phase``, ...) as aliases, for one version; rows read
from older runs are given the new names (:func:`upgrade`). ``metrics.csv`` holds the current names
only, with accuracies in percent as the console prints them (:func:`csv_row`, read back by
:func:`from_csv_row`).
"""

from __future__ import annotations

from typing import Any

EVALUATED = ("teacher", "student", "ensemble", *(f"exit{i}" for i in range(1, 9)))
LOSSES = {"teacher_loss": "train_teacher_loss", "student_loss": "train_student_loss",
          "ce": "train_ce", "kl": "train_kl", "feat": "train_feat"}
# old name -> new name
ALIASES: dict[str, str] = {
    **{f"{m}_{k}": f"test_{m}_{k}" for m in EVALUATED for k in ("top1", "top5")},
    **LOSSES,
}


# fields written only for readers of earlier versions (loop.py writes ``phase`` beside ``trained``)
OLD_NAMES = frozenset(ALIASES) | {"phase"}
PERCENT_SUFFIX = "_pct"


def test_key(model: str, k: str = "top1") -> str:
    """``test_student_top1`` and the like (``model``: teacher, student, ensemble, exitN)."""
    return f"test_{model}_{k}"


def with_aliases(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` plus the earlier names of its fields (same values), for readers of old names."""
    out = dict(row)
    for old, new in ALIASES.items():
        if new in row:
            out[old] = row[new]
    return out


def upgrade(row: dict[str, Any]) -> dict[str, Any]:
    """A row of an earlier version with the current names filled in from the old ones."""
    out = dict(row)
    for old, new in ALIASES.items():
        if old in row and new not in row:
            out[new] = row[old]
    return out


def is_accuracy(key: str) -> bool:
    """``test_<model>_top1`` / ``_top5``: a test accuracy (a fraction in rows and metrics.jsonl)."""
    return key.startswith("test_") and key.endswith(("_top1", "_top5"))


def csv_name(key: str) -> str:
    """The metrics.csv column of field ``key`` (accuracies: ``<key>_pct``)."""
    return key + PERCENT_SUFFIX if is_accuracy(key) else key


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as metrics.csv holds it: no old names; accuracies in percent (4 decimals, enough
    for a million test images) under ``<name>_pct``; self-KD rows without their ``teacher``
    columns, which repeat the deepest exit's own."""
    self_kd = test_key("exit1") in row
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in OLD_NAMES or (self_kd and key.startswith("test_teacher_")):
            continue
        if is_accuracy(key) and value is not None:
            value = round(100.0 * value, 4)
        out[csv_name(key)] = value
    return out


def from_csv_row(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics.csv row (numbers already parsed) with fractions under the current names; rows
    of earlier versions (fractions, no ``_pct``) pass unchanged."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        base = key.removesuffix(PERCENT_SUFFIX)
        if base != key and is_accuracy(base):
            out[base] = value / 100.0 if isinstance(value, (int, float)) else value
        else:
            out[key] = value
    return out
