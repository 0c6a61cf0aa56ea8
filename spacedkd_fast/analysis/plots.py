"""Figures of the evidence tools (matplotlib, Agg backend, written atomically).

``plot_compare``: test top-1 per epoch, one line per group (mean over its runs) with a shaded band
of +- one sample standard deviation. ``plot_flatness``: the loss and accuracy along a
filter-normalised random direction, and each run's Hessian trace, per group.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runs import Group
from .stats import spread

__all__ = ["plot_compare", "plot_flatness"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _mean_band(curves: Sequence[Sequence[tuple[float, float]]]):
    """Curves of ``(x, y)`` -> xs, means, stds (std NaN where fewer than two curves have x)."""
    by_x: dict[float, list[float]] = {}
    for curve in curves:
        for x, y in curve:
            by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    stats = [spread(by_x[x]) for x in xs]
    return xs, [s.mean for s in stats], [s.std for s in stats]


def _band(ax, xs, means, stds, *, color, label, scale=1.0):
    ax.plot(xs, [m * scale for m in means], color=color, label=label, marker="o", markersize=2.5)
    lo = [(m - s) * scale if math.isfinite(s) else math.nan for m, s in zip(means, stds)]
    hi = [(m + s) * scale if math.isfinite(s) else math.nan for m, s in zip(means, stds)]
    if any(math.isfinite(v) for v in lo):
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)


def plot_compare(groups: Sequence[Group], path: str | Path) -> Path:
    """Test top-1 per epoch of the student (self KD: the ensemble) and, where there is one, the
    teacher: per group the mean over its runs, shaded +- 1 sample std."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    self_kd = any(p.startswith("exit") for g in groups for _, p in g.models())
    roles = [("student", "student (self KD: ensemble)" if self_kd else "student")]
    if any(p == "teacher" for g in groups for _, p in g.models()):
        roles.append(("teacher", "teacher"))
    fig, axes = plt.subplots(1, len(roles), figsize=(5.5 * len(roles), 4), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (prefix, title) in zip(axes[0], roles):
        for i, g in enumerate(groups):
            curves = [r.series(f"{prefix}_top1") for r in g.runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            xs, means, stds = _mean_band(curves)
            _band(ax, xs, means, stds, color=colors[i % len(colors)],
                  label=f"{g.name} (n={len(curves)})", scale=100.0)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("test top-1 per epoch: mean over runs, shaded ± 1 std", fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_flatness(entries: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> Path:
    """``entries``: ``(group name, flatness.json contents)`` per run. Loss and top-1 along the
    random direction (mean over a group's runs, shaded +- 1 std) and the Hessian traces."""
    plt = _pyplot()
    names = list(dict.fromkeys(name for name, _ in entries))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (ax_loss, ax_acc, ax_tr) = plt.subplots(1, 3, figsize=(15, 4), dpi=110)
    for i, name in enumerate(names):
        color = colors[i % len(colors)]
        runs = [f for n, f in entries if n == name]
        profiles = [f["profile"] for f in runs if f.get("profile")]
        if profiles:
            n = len(profiles)
            for ax, key, scale in ((ax_loss, "loss", 1.0), (ax_acc, "top1", 100.0)):
                curves = [list(zip(p["alpha"], p[key])) for p in profiles]
                xs, means, stds = _mean_band(curves)
                _band(ax, xs, means, stds, color=color, label=f"{name} (n={n})", scale=scale)
        traces = [(f["hessian_trace"], f.get("hessian_trace_stderr") or 0.0) for f in runs
                  if f.get("hessian_trace") is not None]
        if traces:
            xs = [i + (j - (len(traces) - 1) / 2) * 0.08 for j in range(len(traces))]
            ax_tr.errorbar(xs, [t for t, _ in traces], yerr=[s for _, s in traces], fmt="o",
                           color=color, capsize=3, label=name)
            mean = spread([t for t, _ in traces]).mean
            ax_tr.hlines(mean, i - 0.3, i + 0.3, color=color, linewidth=2)
    ax_loss.set_ylabel("test loss (mean cross-entropy, log scale)")
    if ax_loss.has_data():
        ax_loss.set_yscale("log")
    ax_acc.set_ylabel("test top-1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("step along a filter-normalised random direction")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_tr.set_xticks(range(len(names)), names)
    ax_tr.set_xlim(-0.6, len(names) - 0.4)
    ax_tr.set_ylabel("Hessian trace (± 1 s.e. of the estimate; bar: mean)")
    ax_tr.grid(alpha=0.3, axis="y")
    fig.suptitle("flatness of the best students (smaller trace, wider basin = flatter)",
                 fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
