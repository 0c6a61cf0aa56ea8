"""Reading the output folders of ``python -m spacedkd_fast.train`` and grouping them.

A *run* is a folder holding ``metrics.jsonl`` (or ``metrics.csv``), usually with ``config.yaml``,
``best_student.pt`` and, once ``python -m spacedkd_fast.flatness`` has seen it, ``flatness.json``.
A *group* is a set of runs of one configuration that differ in their seed: a folder whose
sub-folders are runs (``--seeds 0,1,2`` writes ``seed0/``, ``seed1/``, ...), an explicit
``NAME=DIR,DIR`` list, or loose run folders with the same configuration apart from the seed.

Metric names: the trainer renamed its fields (test accuracies gained a ``test_`` prefix, training
losses a ``train_`` prefix; the old names stayed for one version as aliases). ``canonical_row``
reads both through the trainer's table (``train/metric_names.py``) and gives the old, short names (``student_top1``), newest first.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..train.metric_names import ALIASES, from_csv_row

METRICS_FILES = ("metrics.jsonl", "metrics.csv")
FLATNESS_FILE = "flatness.json"
CONFIG_FILE = "config.yaml"

# Current metric name -> the short name of earlier versions, from the trainer's own table (torch-free).
SHORT_NAME = {new: old for old, new in ALIASES.items()}

# Configuration keys that do not change what a run computes (left out when grouping loose runs).
NOT_THE_EXPERIMENT = frozenset({
    "seed", "out", "compare", "log_every", "tensorboard", "wandb", "wandb_project", "trace",
    "data_dir", "device", "description", "overlap", "data_backend", "channels_last", "compile",
    "deterministic", "seeds",
})


class RunError(ValueError):
    """A folder that is not a readable run or group; the message names the path and the problem."""


def canonical_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with renamed metrics under their short names (``test_student_top1`` ->
    ``student_top1``); keys that are not renamed metrics pass unchanged."""
    out: dict[str, Any] = {}
    renamed: set[str] = set()  # a current name wins over the old one when a row has both
    for key, value in row.items():
        short = SHORT_NAME.get(key)
        if short is not None:
            out[short] = value
            renamed.add(short)
        elif key not in renamed:
            out[key] = value
    return out


def _number(text: str) -> Any:
    if text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and re.fullmatch(r"-?\d+", text) else value


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """The epoch rows of the run in ``folder`` (canonical names); ``RunError`` when unreadable."""
    jsonl, csv_path = (folder / name for name in METRICS_FILES)
    rows: list[dict[str, Any]] = []
    try:
        if jsonl.is_file():
            for i, line in enumerate(jsonl.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise RunError(f"{jsonl}: line {i} is not JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise RunError(f"{jsonl}: line {i} is not a JSON object")
                rows.append(row)
            source = jsonl
        else:
            with open(csv_path, newline="") as f:
                # this version's accuracies are percent columns (``_pct``); earlier ones fractions
                rows = [from_csv_row({k: _number(v) for k, v in r.items()})
                        for r in csv.DictReader(f)]
            source = csv_path
    except OSError as err:
        raise RunError(f"cannot read the metrics of {folder}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise RunError(f"the metrics of {folder} are not text") from None
    rows = [canonical_row(r) for r in rows]
    if not rows:
        raise RunError(f"{source} holds no epoch rows (did the run finish an epoch?)")
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("epoch"), (int, float)) or isinstance(r.get("epoch"), bool):
            raise RunError(f"{source}: row {i} has no numeric 'epoch'")
    return rows


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RunError(f"{path} is not readable YAML ({type(err).__name__})") from None
    return data if isinstance(data, dict) else {}


def _read_flatness(folder: Path) -> dict[str, Any] | None:
    path = folder / FLATNESS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{path} is not readable JSON ({type(err).__name__})") from None
    return data if isinstance(data, dict) else None


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class Run:
    """One training run: its folder, epoch rows (canonical names), configuration, flatness."""

    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    flatness: dict[str, Any] | None = None

    @classmethod
    def read(cls, folder: str | os.PathLike) -> Run:
        folder = Path(folder)
        return cls(folder, read_rows(folder), _read_config(folder), _read_flatness(folder))

    @property
    def name(self) -> str:
        return self.path.name

    def series(self, key: str) -> list[tuple[float, float]]:
        """``(epoch, value)`` for every row where ``key`` is a finite number."""
        out = []
        for r in self.rows:
            v = _finite(r.get(key))
            if v is not None:
                out.append((float(r["epoch"]), v))
        return out

    def best(self, key: str) -> float | None:
        values = [v for _, v in self.series(key)]
        return max(values) if values else None

    def final(self, key: str) -> float | None:
        """``key`` in the last row (None when that row lacks it)."""
        return _finite(self.rows[-1].get(key))

    def hessian_trace(self) -> float | None:
        return _finite((self.flatness or {}).get("hessian_trace"))

    def models(self) -> list[tuple[str, str]]:
        """``(display name, metric prefix)`` of each model the run evaluated.

        Self-KD runs: each exit and the ensemble (the run's "student"; its "teacher" column repeats
        the deepest exit and is left out); others: teacher (when there is one) and student.
        """
        keys = {k for r in self.rows for k, v in r.items() if _finite(v) is not None}
        exits = sorted((k[:-5] for k in keys if re.fullmatch(r"exit\d+_top1", k)),
                       key=lambda e: int(e[4:]))
        if exits:
            return [(e.replace("exit", "exit "), e) for e in exits] + [("ensemble", "student")]
        out = [("teacher", "teacher")] if "teacher_top1" in keys else []
        return out + [("student", "student")]


@dataclass
class Group:
    """Runs of one configuration (seeds); ``source``: the folders it was read from."""

    name: str
    runs: list[Run]
    source: list[Path] = field(default_factory=list)

    def models(self) -> list[tuple[str, str]]:
        seen: dict[str, str] = {}
        for run in self.runs:
            for label, prefix in run.models():
                seen.setdefault(prefix, label)
        return [(label, prefix) for prefix, label in seen.items()]


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def is_run(folder: Path) -> bool:
    return any((folder / name).is_file() for name in METRICS_FILES)


def _run_dirs(folder: Path) -> list[Path]:
    try:
        subs = sorted((p for p in folder.iterdir() if p.is_dir()), key=_natural)
    except OSError as err:
        raise RunError(f"cannot list {folder}: {err.strerror or err}") from None
    return [p for p in subs if is_run(p)]


def expand(path: str | os.PathLike) -> tuple[str, Path | list[tuple[Path, list[Path]]]]:
    """What a command-line folder is: ``("run", folder)``, or ``("groups", [(folder, runs)])``
    for a group (sub-folders are runs) or a folder of groups (sub-sub-folders are runs)."""
    folder = Path(path)
    if not folder.exists():
        raise RunError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise RunError(f"{folder} is not a folder (give a run's output folder or a folder of runs)")
    if is_run(folder):
        return "run", folder
    runs = _run_dirs(folder)
    if runs:
        return "groups", [(folder, runs)]
    groups = []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir()), key=_natural):
        sub_runs = _run_dirs(sub)
        if sub_runs:
            groups.append((sub, sub_runs))
    if not groups:
        raise RunError(f"no runs found in {folder} (a run folder holds metrics.jsonl; a group "
                       "folder holds run folders)")
    return "groups", groups


def _signature(run: Run) -> tuple:
    if not run.config:
        return ("folder", str(run.path.parent.resolve()))
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=str))
                        for k, v in run.config.items() if k not in NOT_THE_EXPERIMENT))


def _loose_groups(runs: list[Run]) -> list[Group]:
    """Loose run folders grouped by configuration (seed and bookkeeping keys aside)."""
    by_sig: dict[tuple, list[Run]] = {}
    for run in runs:
        by_sig.setdefault(_signature(run), []).append(run)
    members = list(by_sig.values())
    parents = [{r.path.parent.resolve() for r in rs} for rs in members]
    parent_names = [next(iter(p)).name if len(p) == 1 else None for p in parents]
    distinct_parents = (None not in parent_names and len(set(parent_names)) == len(parent_names))
    configs = [rs[0].config for rs in members]
    differing = sorted({k for c in configs for k in c if k not in NOT_THE_EXPERIMENT
                        and len({json.dumps(cc.get(k), sort_keys=True, default=str)
                                 for cc in configs}) > 1})
    groups = []
    for rs, parent_name, cfg in zip(members, parent_names, configs):
        if len(rs) == 1:
            name = rs[0].name
        elif distinct_parents:
            name = parent_name
        elif differing and cfg:
            name = " ".join(f"{k}={cfg.get(k)}" for k in differing)
        else:
            name = rs[0].name if len(rs) == 1 else f"{rs[0].name}..{rs[-1].name}"
        groups.append(Group(name, rs, [r.path for r in rs]))
    return groups


def parse_group_spec(spec: str) -> tuple[str, list[str]]:
    """``"NAME=DIR1,DIR2"`` -> ``("NAME", ["DIR1", "DIR2"])``."""
    name, sep, dirs = spec.partition("=")
    folders = [d for d in dirs.split(",") if d]
    if not sep or not name or not folders:
        raise RunError(f"--group {spec!r}: expected NAME=DIR1,DIR2,...")
    return name, folders


def collect(paths: Sequence[str | os.PathLike] = (),
            named: Iterable[tuple[str, Sequence[str | os.PathLike]]] = ()) -> list[Group]:
    """The groups of runs behind command-line folders (``paths``) and ``NAME=DIR,...`` groups.

    Raises ``RunError`` (one-line message) for a missing folder, a folder without runs, or
    unreadable metrics.
    """
    groups: list[Group] = []
    loose: list[Run] = []
    for p in paths:
        kind, found = expand(p)
        if kind == "run":
            loose.append(Run.read(found))
        else:
            for folder, runs in found:
                groups.append(Group(folder.name, [Run.read(r) for r in runs], [folder]))
    groups += _loose_groups(loose)
    for name, folders in named:
        runs: list[Run] = []
        for f in folders:
            kind, found = expand(f)
            if kind == "run":
                runs.append(Run.read(found))
            else:
                runs += [Run.read(r) for _, rs in found for r in rs]
        groups.append(Group(name, runs, [Path(f) for f in folders]))
    if not groups:
        raise RunError("no runs given (name run folders, group folders, or --group NAME=DIR,...)")
    names = [g.name for g in groups]
    for i, g in enumerate(groups):  # keep names unique: the table and the test refer to them
        if names.count(g.name) > 1:
            g.name = f"{g.name}#{names[:i + 1].count(g.name)}"
    return groups
