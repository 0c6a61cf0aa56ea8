"""``curves.png``: test accuracy and the parts of each model's training loss, one panel each.

Panels: test top-1 of every evaluated model; the teacher's training CE; the student's CE and KD
(KL) parts; the student's feature term (when it has one). Each loss part gets its own axis: the
student's total mixes terms of very different sizes (the feature term alone is often several times
the CE), so putting totals side by side would compare unlike things.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .metric_names import test_key, upgrade


def _series(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    return [scale * r[key] if r.get(key) is not None else float("nan") for r in rows]


def _has(rows: list[dict[str, Any]], key: str) -> bool:
    return any(r.get(key) is not None and math.isfinite(r[key]) for r in rows)


def panels_of(rows: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str, float]]]]:
    """``[(panel title, [(label, metrics key, scale), ...]), ...]`` for the rows at hand."""
    rows = [upgrade(r) for r in rows]
    acc = [(m, test_key(m), 100.0) for m in ("teacher", "student") if _has(rows, test_key(m))]
    acc += [(f"exit {i}", test_key(f"exit{i}"), 100.0) for i in range(1, 9)
            if _has(rows, test_key(f"exit{i}"))]
    panels = [("test top-1 (%)", acc)]
    if _has(rows, "train_teacher_loss"):
        panels.append(("teacher: training CE", [("CE", "train_teacher_loss", 1.0)]))
    student = [(label, key, 1.0) for label, key in (("CE", "train_ce"), ("KD (KL)", "train_kl"))
               if _has(rows, key)]
    if not student and _has(rows, "train_student_loss"):  # base / self KD: one total
        student = [("loss", "train_student_loss", 1.0)]
    if student:
        panels.append(("student: CE and KD parts", student))
    if _has(rows, "train_feat"):
        panels.append(("student: feature term", [("feature", "train_feat", 1.0)]))
    return panels


def plot_curves(rows: list[dict[str, Any]], path: str | Path, *, title: str = "") -> None:
    """Draw :func:`panels_of` ``rows`` per epoch to a PNG (matplotlib Agg), atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = panels_of(rows)
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=100,
                             squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels):
        for label, key, scale in lines:
            ax.plot(epochs, _series(rows, key, scale), marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
