"""The comparison of groups of runs: per-model best and final top-1 (mean, std, n), the Hessian
trace when ``flatness.json`` is there, and each group's difference from a baseline group with
Welch's t-test and a 95% interval. ``summarize`` gives plain JSON-able data, ``format_text`` the
table that ``python -m spacedkd_fast.compare`` prints.

Accuracies are in percent (the metrics files hold fractions). "best" is the highest test top-1 over
a run's epochs (what the paper reports), "final" the last epoch's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .runs import Group
from .stats import spread, welch_ttest

__all__ = ["summarize", "format_text"]


def _stat(values: list[float | None], scale: float = 1.0) -> dict[str, Any]:
    kept = [v * scale for v in values if v is not None]
    return {**spread(kept).as_dict(), "values": kept}


def _json_number(x: Any) -> Any:
    """NaN and infinities become None so that the summary is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_number(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_number(v) for v in x]
    return x


def _group_summary(group: Group) -> dict[str, Any]:
    models = []
    for label, prefix in group.models():
        key = f"{prefix}_top1"
        models.append({"model": label, "key": key,
                       "best": _stat([r.best(key) for r in group.runs], 100.0),
                       "final": _stat([r.final(key) for r in group.runs], 100.0)})
    traces = [r.hessian_trace() for r in group.runs]
    hessian = None
    if any(t is not None for t in traces):
        hessian = _stat(traces)
        hessian["stderr"] = [(r.flatness or {}).get("hessian_trace_stderr")
                             for r in group.runs if r.hessian_trace() is not None]
    return {"name": group.name, "folders": [str(p) for p in group.source],
            "runs": [str(r.path) for r in group.runs],
            "epochs": [int(r.rows[-1]["epoch"]) for r in group.runs],
            "models": models, "hessian_trace": hessian}


def _student(summary: dict[str, Any]) -> dict[str, Any] | None:
    for m in summary["models"]:
        if m["key"] == "student_top1":
            return m
    return None


def summarize(groups: Sequence[Group], *, baseline: str | None = None,
              confidence: float = 0.95) -> dict[str, Any]:
    """Everything the table shows, as JSON-able data (NaN written as None).

    ``baseline``: the group the others are compared with (default: the first). Differences are
    ``group - baseline`` for the student's (self KD: the ensemble's) best and final top-1, and the
    Hessian trace where both groups have one.
    """
    names = [g.name for g in groups]
    if baseline is None:
        baseline = names[0]
    if baseline not in names:
        raise ValueError(f"--baseline {baseline!r} is not one of the groups: {', '.join(names)}")
    summaries = [_group_summary(g) for g in groups]
    base = summaries[names.index(baseline)]
    differences = []
    for s in summaries:
        if s is base:
            continue
        pairs = []
        mine, theirs = _student(s), _student(base)
        if mine and theirs:
            label = theirs["model"]
            pairs += [(f"{label} best top-1 (points)", mine["best"], theirs["best"]),
                      (f"{label} final top-1 (points)", mine["final"], theirs["final"])]
        if s["hessian_trace"] and base["hessian_trace"]:
            pairs.append(("Hessian trace", s["hessian_trace"], base["hessian_trace"]))
        for metric, a, b in pairs:
            w = welch_ttest(a["values"], b["values"], confidence=confidence)
            differences.append({"group": s["name"], "baseline": baseline, "metric": metric,
                                **w.as_dict()})
    return _json_number({"units": {"top1": "percent"},
                         "baseline": baseline, "confidence": confidence, "groups": summaries,
                         "differences": differences})


# ----------------------------------------------------------------------------------- text
def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def decimals(*values: float | None) -> str:
    """A fixed-point format with about four significant digits for the largest of ``values``."""
    big = max((abs(v) for v in values if v is not None and v != 0), default=1.0)
    return f".{max(0, 3 - math.floor(math.log10(big)))}f"


def _mean_std(stat: dict[str, Any], fmt: str = ".2f") -> str:
    if not stat or not stat["n"]:
        return "-"
    if stat["n"] < 2 or stat["std"] is None:
        return _num(stat["mean"], fmt)
    return f"{_num(stat['mean'], fmt)} ± {_num(stat['std'], fmt)}"


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return [line(header), "-" * len(line(header))] + [line(r) for r in rows]


def format_text(summary: dict[str, Any]) -> str:
    """The comparison as a plain-text table (what ``compare`` prints and writes to compare.txt)."""
    out = ["Test top-1 (%): mean ± sample std over n runs; best = highest over the epochs, "
           "final = last epoch", ""]
    rows = []
    for g in summary["groups"]:
        for m in g["models"]:
            rows.append([g["name"], m["model"], _mean_std(m["best"]), _mean_std(m["final"]),
                         str(m["best"]["n"])])
    out += _table(["group", "model", "best top-1", "final top-1", "n"], rows, "llrrr")
    if any(g["hessian_trace"] for g in summary["groups"]):
        out += ["", "Hessian trace of the best student (test set, Hutchinson; smaller = flatter):"]
        rows = []
        for g in summary["groups"]:
            h = g["hessian_trace"]
            if h:
                se = [s for s in h["stderr"] if s is not None]
                se_text = format(max(se), decimals(h["mean"])) if se else "-"
                rows.append([g["name"], _mean_std(h, decimals(h["mean"])), se_text, str(h["n"])])
            else:
                rows.append([g["name"], "- (run python -m spacedkd_fast.flatness)", "", "0"])
        out += _table(["group", "trace", "s.e. of estimate (max)", "n"], rows, "lrrr")
    if summary["differences"]:
        pct = int(round(100 * summary["confidence"]))
        out += ["", f"Difference from {summary['baseline']} (group - baseline; Welch's t-test, "
                f"{pct}% interval):"]
        rows = []
        for d in summary["differences"]:
            fmt = "+.2f"
            if d["metric"] == "Hessian trace":
                fmt = "+" + decimals(d["diff"], d["low"], d["high"])
            interval = ("-" if d["low"] is None else
                        f"[{format(d['low'], fmt)}, {format(d['high'], fmt)}]")
            rows.append([d["group"], d["metric"], _num(d["diff"], fmt), interval,
                         _num(d["p"], ".3g"), f"{d['n_a']} vs {d['n_b']}"])
        out += _table(["group", "metric", "diff", f"{pct}% interval", "p", "n"], rows, "llrrrr")
        if any(d["p"] is None for d in summary["differences"]):
            out.append("(- : a test needs at least 2 runs with some spread in each group)")
    return "\n".join(out)
