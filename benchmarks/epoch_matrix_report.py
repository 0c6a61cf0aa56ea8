"""The epoch matrix's table, ratios and targets (``epoch_matrix.py`` measures; this prints)."""

from __future__ import annotations

import sys

# issue 12's targets for an H100/H200 (reported next to the results, never asserted)
TARGETS = {"epoch_s": 2.5, "vs_official": 10.0, "spaced_over_online": 1.05, "busy": 0.90}


def ratios(rows: dict[str, dict], *, official: str, online: str, spaced: set[str]) -> dict:
    """Images/s against the ``official`` row's, and the ``spaced`` rows' epoch time over the
    ``online`` row's (rows that finished only)."""
    ok = {k: r for k, r in rows.items() if r.get("status") == "ok"}
    out: dict = {}
    base = ok.get(official, {}).get("images_per_s")
    online_s = ok.get(online, {}).get("epoch_s")
    for name, r in ok.items():
        if base and name != official:
            out.setdefault("vs_official", {})[name] = r["images_per_s"] / base
        if online_s and name in spaced:
            out.setdefault("spaced_over_online", {})[name] = r["epoch_s"] / online_s
    return out


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def report(result: dict, order: list[str], stream=None) -> None:
    """The matrix as a table (rows in ``order``), the targets and the ratios."""
    meta, rows, rat = result["meta"], result["rows"], result["ratios"]
    w = (stream or sys.stdout).write
    w(f"== epoch matrix: {meta['device_name']}, torch {meta['torch']}, {meta['images']} images "
      f"{meta['image_size']} px, {meta['classes']} classes, batch {meta['batch']}, "
      f"L = {meta['steps_per_epoch']} steps, s = {meta['interval_rate']}, resnet18 pair"
      f"{' ' + str(meta['model_kwargs']) if meta['model_kwargs'] else ''}\n")
    if meta["device"] == "cpu":
        w("   CPU MINIATURE: exercises the code path; says nothing about GPU speed\n")
    w(f"{'variant':<17}{'status':<14}{'epoch s':>9}{'ms/step':>9}{'images/s':>10}{'busy':>7}"
      f"{'graphs':>7}  {'timed T/S':>9}  {'prof T/S':>7}\n")
    for name in order:
        if name in rows:
            w(row_line(rows[name]) + "\n")
    w("T/S: teacher / student steps in the timed window and in the profiled one (busy, graph "
      "launches); '-': no CUDA profiler\n")
    t = TARGETS
    w(f"targets (H100/H200, reported, not asserted): spaced epoch <= {t['epoch_s']} s; images/s "
      f">= {t['vs_official']:g}x the official loop; spaced <= {t['spaced_over_online']:g}x online's "
      f"epoch; GPU busy >= {t['busy']:.0%}\n")
    for name, v in rat.get("vs_official", {}).items():
        w(f"  {name:<17} images/s vs official loop: {v:6.2f}x  (target >= {t['vs_official']:g}x)\n")
    for name, v in rat.get("spaced_over_online", {}).items():
        w(f"  {name:<17} epoch time / online's:    {v:6.3f}   (target <= {t['spaced_over_online']:g})\n")


def row_line(r: dict) -> str:
    prof = r.get("profile") or {}
    return (f"{r['name']:<17}{r['status']:<14}{_fmt(r.get('epoch_s'), '9.2f'):>9}"
            f"{_fmt(r.get('ms_per_step'), '9.2f'):>9}{_fmt(r.get('images_per_s'), '10.0f'):>10}"
            f"{_fmt(prof.get('busy'), '7.1%'):>7}{_fmt(prof.get('graph_launches'), 'd'):>7}  "
            f"{_steps(r, 'timed_teacher_steps', 'timed_student_steps'):>9}  "
            f"{_steps(prof, 'teacher_steps', 'student_steps'):>7}"
            f"{'  ' + r['note'] if r.get('note') else ''}")


def _steps(d: dict, teacher: str, student: str) -> str:
    return f"{d[teacher]}/{d[student]}" if teacher in d else "-"
