"""Names of the per-epoch metrics: ``test_*`` for accuracies on the test set, ``train_*`` for
means of training losses over the epoch.

Rows written by this version also carry the names of earlier versions (``teacher_top1``,
``student_loss``, ``ce``, ...) as aliases, for one version; rows read from older runs are given
the new names (:func:`upgrade`).
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
