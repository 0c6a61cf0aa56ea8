"""One training run in an output folder: ``train(cfg)`` for a new run, ``resume(out)`` to continue.

The parts are built by :func:`spacedkd_fast.train.build.build_run`, trained by
:func:`spacedkd_fast.train.loop.run_loop`, and reported by :mod:`spacedkd_fast.train.report`; this
module prepares the folder, handles the ways a run ends, and returns the exit status.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from .build import RunParts, build_run, n_params, resolve_dataset
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, restore_parts
from .config import TrainConfig, apply_dataset_defaults, from_dict, save_yaml
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .errors import (  # noqa: F401 - re-exported: callers read the statuses here
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_OK,
    Interrupted,
    UserError,
)
from .history import RunHistory
from .loop import run_loop
from .report import (
    ExternalLoggers,
    models_text,
    nonfinite_text,
    plot_curves,
    read_metrics,
    run_header,
    summary_models,
    summary_table,
)
from .stop import StopRequest


def prepare_output(cfg: TrainConfig, info: DistInfo, *, resuming: bool) -> Path:
    """Create (or check) the output folder; rank 0 decides, every rank learns the name."""
    if cfg.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        data = (cfg.dataset or "auto").replace("folder:", "").replace("/", "_")
        cfg.out = f"runs/{stamp}-{cfg.mode}-{cfg.student}-{data}"
    error = None
    if info.is_main:
        out = Path(cfg.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            error = f"--out {out}: cannot write there ({err.strerror or err})"
        if error is None and not resuming and (out / CHECKPOINT_NAME).exists():
            error = (f"{out} already holds a run (checkpoint.pt); continue it with --resume "
                     f"{out} or choose another --out")
    if info.enabled:
        box = [error, cfg.out]
        dist.broadcast_object_list(box, src=0)
        error, cfg.out = box
    if error:
        raise UserError(error)
    return Path(cfg.out)


def _announce(parts: RunParts, history: RunHistory, digits_changes: list[str]) -> None:
    cfg, info, data = parts.cfg, parts.info, parts.data
    history.say(getattr(data, "announcement", "") or f"data: {data.name}")
    if digits_changes:
        history.say(f"digits defaults: {', '.join(digits_changes)} (the recipe's values are for "
                    "CIFAR-100; set these flags to override)")
    where = (f"{parts.device}" + (f" x {info.world_size} processes" if info.enabled else "")
             + (f", {torch.get_num_threads()} CPU threads" if parts.device.type == "cpu" else ""))
    history.say(f"spacedkd_fast {__version__}, torch {torch.__version__}, device {where}, "
                f"amp {cfg.amp}, data backend {getattr(data, 'backend', '?')}")
    models = [(parts.student_arch, n_params(parts.student))]
    if parts.teacher is not None:
        models.insert(0, (cfg.teacher, n_params(parts.teacher)))
    history.say(run_header(cfg, models=models_text(cfg, models), num_classes=data.num_classes,
                           image_size=data.image_size, steps_per_epoch=parts.steps_per_epoch))
    history.say(f"output: {history.out}")


def _final_report(parts: RunParts, history: RunHistory) -> None:
    if not parts.info.is_main or not history.rows:
        return
    cfg, rows, out = parts.cfg, history.rows, history.out
    plot_curves(rows, out / "curves.png",
                title=f"{cfg.mode} KD, {cfg.student} on {parts.data.name}")
    rates = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    compare = None
    if cfg.compare:
        try:
            compare = read_metrics(cfg.compare)
        except (OSError, ValueError) as err:
            history.say(f"--compare {cfg.compare}: cannot read its metrics.jsonl ({err})")
    table = summary_table(rows, wall_s=history.wall(),
                          images_per_s=float(np.mean(rates)) if rates else 0.0,
                          models=summary_models(cfg, has_teacher=parts.teacher is not None,
                                                last_row=rows[-1]),
                          compare=compare,
                          compare_name=Path(cfg.compare).name if cfg.compare else "")
    (out / "summary.txt").write_text(table + "\n")
    history.say("\n" + table)
    history.say(f"outputs in {out}: metrics.jsonl, metrics.csv, config.yaml, curves.png, "
                "summary.txt, checkpoint.pt, best_student.pt")


def execute(cfg: TrainConfig, info: DistInfo, *, state: dict[str, Any] | None, progress: bool,
            data: Any = None, stream: TextIO | None = None,
            digits_changes: list[str] | None = None) -> int:
    """Build, (restore,) train and report one run; returns the exit status."""
    from ..engine.distill import NonFiniteLossError

    out = prepare_output(cfg, info, resuming=state is not None)
    loggers = None
    if info.is_main:  # optional loggers first: a missing package fails before any work
        try:
            loggers = ExternalLoggers(out, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                      project=cfg.wandb_project, config=cfg.to_dict(),
                                      run_name=out.name)
        except ImportError as err:
            raise UserError(str(err)) from None
    parts = build_run(cfg, info, data=data)
    status = EXIT_OK
    try:
        if state is not None:
            try:
                restore_parts(parts, state)
            except CheckpointError as err:
                raise UserError(str(err)) from None
        if info.is_main:
            save_yaml(cfg, out / "config.yaml")
        history = RunHistory(parts, out, stream=stream, state=state, loggers=loggers)
        _announce(parts, history, digits_changes or [])
        if state is not None:
            history.say(f"resuming after epoch {state['epoch']}"
                        + (f", step {state['step_in_epoch']} of epoch {state['epoch'] + 1}"
                           if state["step_in_epoch"] else ""))
        try:
            with StopRequest() as stop:
                if (state or {}).get("finished", False):
                    history.say("this run had already finished; nothing left to train")
                else:
                    run_loop(parts, history, stop, state, progress=progress)
        except Interrupted:
            history.say(f"interrupted: state saved in {out / CHECKPOINT_NAME}; continue with "
                        f"python -m spacedkd_fast.train --resume {out}")
            status = EXIT_INTERRUPTED
        except NonFiniteLossError as err:
            history.say(nonfinite_text(err, steps_per_epoch=parts.steps_per_epoch,
                                       last_epoch=history.rows[-1]["epoch"] if history.rows else 0,
                                       checkpoint=out / CHECKPOINT_NAME))
            status = EXIT_NONFINITE
    finally:
        parts.distiller.close()
        if loggers is not None:
            loggers.close()
    if status == EXIT_OK:
        _final_report(parts, history)
        barrier(info)
    # otherwise no collective: after a non-finite loss on one rank the others may be waiting
    # in a gradient all-reduce; the exit status makes torchrun stop them
    return status


def _threads_for_cpu(info: DistInfo) -> None:
    # Several processes on one CPU machine would oversubscribe the cores with torch's defaults.
    if info.enabled and info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.world_size))


def train(cfg: TrainConfig, *, progress: bool = True, data: Any = None,
          stream: TextIO | None = None) -> int:
    """Run ``cfg`` from scratch; returns the exit status (0 ok, 3 non-finite loss, 130 SIGINT).

    ``data``: a prebuilt ``DataBundle`` (tests inject tiny or poisoned data this way).
    """
    info = init_distributed(cfg.device)
    try:
        _threads_for_cpu(info)
        # injected data (tests) is already built: its batch size is the caller's business
        changes = apply_dataset_defaults(cfg, resolve_dataset(cfg)) if data is None else []
        return execute(cfg, info, state=None, progress=progress, data=data, stream=stream,
                       digits_changes=changes)
    finally:
        cleanup(info)


def resume(out: str | os.PathLike, *, overrides: dict[str, Any] | None = None,
           progress: bool = True, data: Any = None, stream: TextIO | None = None) -> int:
    """Continue the run in ``out`` from its checkpoint with its saved configuration."""
    try:
        state = load_checkpoint(out)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    values = dict(state["config"])
    values.update(overrides or {})
    values["out"] = str(out)
    cfg = from_dict(values)
    info = init_distributed(cfg.device)
    try:
        _threads_for_cpu(info)
        return execute(cfg, info, state=state, progress=progress, data=data, stream=stream)
    finally:
        cleanup(info)
