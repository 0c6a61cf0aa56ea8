"""``curves.png``: test accuracy and the parts of each model's training loss, one panel each.

Panels: test top-1 of every evaluated model; the teacher's training CE; the student's CE and KD
parts; the student's feature term (when it has one). Each loss part gets its own axis: the
student's total mixes terms of very different sizes (the feature term alone is often several times
the CE), so putting totals side by side would compare unlike things.

Self KD has no teacher and student: its panels name the exits, the ensemble, the deepest exit's
CE-only steps and the self-KD steps. Epochs at which the student had not trained yet (spaced KD
before its first replay; :func:`.report.untrained_epochs`) are shaded in the accuracy panel, so
that its initial accuracy is not read as a result. The epoch axis has integer ticks only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .metric_names import test_key, upgrade
from .report import untrained_epochs

UNTRAINED_LABEL = "student not trained yet (initial weights)"
UNTRAINED_LABEL_SELF = "shallow exits not trained yet (initial weights)"


def _series(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[float]:
    return [scale * r[key] if r.get(key) is not None else float("nan") for r in rows]


def _has(rows: list[dict[str, Any]], key: str) -> bool:
    return any(r.get(key) is not None and math.isfinite(r[key]) for r in rows)


def panels_of(rows: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str, float]]]]:
    """``[(panel title, [(label, metrics key, scale), ...]), ...]`` for the rows at hand."""
    rows = [upgrade(r) for r in rows]
    exits = [(f"exit {i}", test_key(f"exit{i}"), 100.0) for i in range(1, 9)
             if _has(rows, test_key(f"exit{i}"))]
    if exits:  # self KD: the "teacher" column repeats the deepest exit, the "student" is the ensemble
        return _self_panels(rows, exits)
    acc = [(m, test_key(m), 100.0) for m in ("teacher", "student") if _has(rows, test_key(m))]
    panels = [("test top-1 (%)", acc)]
    if _has(rows, "train_teacher_loss"):
        panels.append(("teacher: training CE", [("CE", "train_teacher_loss", 1.0)]))
    student = [(label, key, 1.0) for label, key in (("CE", "train_ce"), ("KD (KL)", "train_kl"))
               if _has(rows, key)]
    if not student and _has(rows, "train_student_loss"):  # base: one total
        student = [("loss", "train_student_loss", 1.0)]
    if student:
        panels.append(("student: CE and KD parts", student))
    if _has(rows, "train_feat"):
        panels.append(("student: feature term", [("feature", "train_feat", 1.0)]))
    return panels


def _self_panels(rows, exits):
    acc = exits + [("ensemble", test_key("student"), 100.0)]
    panels = [("test top-1 (%)", acc)]
    if _has(rows, "train_teacher_loss"):  # spaced self KD's CE-only steps
        panels.append(("deepest exit: CE-only steps", [("CE", "train_teacher_loss", 1.0)]))
    parts = [(label, key, 1.0) for label, key in (("deepest-exit CE", "train_ce"),
                                                  ("KD (KL)", "train_kl")) if _has(rows, key)]
    if not parts and _has(rows, "train_student_loss"):
        parts = [("loss", "train_student_loss", 1.0)]
    if parts:
        panels.append(("self-KD steps: CE and KD parts", parts))
    if _has(rows, "train_feat"):
        panels.append(("self-KD steps: feature term", [("feature", "train_feat", 1.0)]))
    return panels


def plot_curves(rows: list[dict[str, Any]], path: str | Path, *, title: str = "") -> None:
    """Draw :func:`panels_of` ``rows`` per epoch to a PNG (matplotlib Agg), atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig = draw_curves(rows, title=title)
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def draw_curves(rows: list[dict[str, Any]], *, title: str = ""):
    """The matplotlib figure of :func:`plot_curves` (the caller closes it)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = panels_of(rows)
    epochs = [r["epoch"] for r in rows]
    untrained = untrained_epochs(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=100,
                             squeeze=False)
    for i, (ax, (name, lines)) in enumerate(zip(axes[0], panels)):
        for label, key, scale in lines:
            ax.plot(epochs, _series(rows, key, scale), marker="o", markersize=3, label=label)
        if i == 0 and untrained:
            exits = any(key.startswith("test_exit") for _, key, _ in lines)
            ax.axvspan(min(untrained) - 0.5, max(untrained) + 0.5, color="0.85", zorder=0,
                       label=UNTRAINED_LABEL_SELF if exits else UNTRAINED_LABEL)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        # integer epochs: a half-epoch margin keeps a one-epoch run from ticks such as 1.925
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
