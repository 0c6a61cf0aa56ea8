"""One training run in an output folder: ``train(cfg)`` for a new run, ``resume(out)`` to continue.

The parts are built by :func:`spacedkd_fast.train.build.build_run`, trained by
:func:`spacedkd_fast.train.loop.run_loop`, and reported by :mod:`spacedkd_fast.train.report`; this
module prepares the folder, handles the ways a run ends, and returns the exit status.
"""

from __future__ import annotations

import errno
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..engine.errors import NonFiniteLossError
from .build import RunParts, build_run, n_params, resolve_dataset
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    WriteError,
    load_checkpoint,
    restore_parts,
)
from .config import (
    TrainConfig,
    apply_dataset_defaults,
    check_runnable,
    save_yaml,
)
from .curves import plot_curves
from .distributed import DistInfo, barrier, cleanup, init_distributed
from .errors import (  # noqa: F401 - re-exported: callers read the statuses here
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_WRITE_FAILED,
    Interrupted,
    UserError,
)
from .history import RunHistory
from .loop import run_loop
from .report import (
    ExternalLoggers,
    models_text,
    nonfinite_text,
    read_metrics,
    run_header,
    spacing_warning,
    summary_models,
    summary_table,
)
from .resuming import agreed_checkpoint, refit_threads, resume_notes, resume_plan
from .speed_defaults import apply_speed_defaults
from .stop import StopRequest

AUTO = "auto"  # --resume auto: continue the run in --out if there is one, else start it


def default_out(cfg: TrainConfig, dataset: str, suffix: str = "") -> str:
    """``runs/<time>-<mode>-<student>-<data set actually used>``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # folder:PATH keeps its last parts; torchvision:CLASS / MODULE:FUNCTION lose the colon, which
    # some shells, scp and Windows shares treat as special in a path
    data = dataset.replace("folder:", "").replace("/", "_").replace(":", "-")
    return f"runs/{stamp}-{cfg.mode}-{cfg.student}-{data}{suffix}"


def prepare_output(cfg: TrainConfig, info: DistInfo, *, resuming: bool) -> Path:
    """Create (or check) the output folder; rank 0 decides, every rank learns the name."""
    if cfg.out is None:
        cfg.out = default_out(cfg, cfg.dataset or "auto")
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
                     f"{out} (or --resume auto, which continues it if it is there) or choose "
                     "another --out")
    if info.enabled:
        box = [error, cfg.out]
        dist.broadcast_object_list(box, src=0)
        error, cfg.out = box
    if error:
        raise UserError(error)
    return Path(cfg.out)


def _announce(parts: RunParts, history: RunHistory, digits_changes: list[str],
              speed_note: str) -> None:
    cfg, info, data = parts.cfg, parts.info, parts.data
    history.say(getattr(data, "announcement", "") or f"data: {data.name}")
    if digits_changes:
        history.say(f"digits defaults: {', '.join(digits_changes)} (the recipe's values are for "
                    "CIFAR-100; set these flags to override)")
    where = (f"{parts.device}" + (f" x {info.world_size} processes" if info.enabled else "")
             + (f", {_threads_text()}" if parts.device.type == "cpu" else ""))
    history.say(f"spacedkd_fast {__version__}, torch {torch.__version__}, device {where}, "
                f"{speed_note}, data backend {getattr(data, 'backend', '?')}")
    models = [(parts.student_arch, n_params(parts.student))]
    if parts.teacher is not None:
        models.insert(0, (cfg.teacher, n_params(parts.teacher)))
    history.say(run_header(cfg, models=models_text(cfg, models), num_classes=data.num_classes,
                           image_size=data.image_size, steps_per_epoch=parts.steps_per_epoch))
    warning = spacing_warning(cfg, getattr(parts.distiller, "schedule", None),
                              steps_per_epoch=parts.steps_per_epoch,
                              flush_tail=getattr(parts.distiller, "flush_tail", True))
    if warning:
        history.say(warning)
    history.say(f"output: {history.out}")


def _final_report(parts: RunParts, history: RunHistory) -> None:
    if not parts.info.is_main or not history.rows:
        return
    cfg, rows, out = parts.cfg, history.rows, history.out
    plot_curves(rows, out / "curves.png",
                title=f"{cfg.mode} KD, {parts.student_arch} on {parts.data.name}")
    rates = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    compare = None
    if cfg.compare:
        try:
            compare = read_metrics(cfg.compare)
        except (OSError, ValueError) as err:
            history.say(f"--compare {cfg.compare}: cannot read its metrics.jsonl ({err})")
    wall = history.wall()
    models = [(parts.student_arch, n_params(parts.student))]
    if parts.teacher is not None:
        models.insert(0, (cfg.teacher, n_params(parts.teacher)))
    spacing = (f", s={cfg.interval_rate:g} (replay every "
               f"{int(parts.steps_per_epoch * cfg.interval_rate)} steps)"
               if cfg.mode in ("spaced", "spaced-self") else "")
    heading = [f"{cfg.mode} KD{spacing} on {cfg.dataset or parts.data.name}: "
               f"{models_text(cfg, models)}",
               f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} of {parts.steps_per_epoch} steps, batch {cfg.batch_size}, "
               f"seed {cfg.seed}; wall time {wall:.1f} s"]
    table = summary_table(rows, wall_s=wall, heading=heading,
                          images_per_s=float(np.mean(rates)) if rates else 0.0,
                          models=summary_models(cfg, has_teacher=parts.teacher is not None,
                                                last_row=rows[-1]),
                          compare=compare,
                          compare_name=Path(cfg.compare).name if cfg.compare else "")
    # the one place a write may fail after training: report it, the run itself is saved
    (out / "summary.txt").write_text(table + "\n")
    history.say("\n" + table)
    history.say(f"outputs in {out}: metrics.jsonl, metrics.csv, config.yaml, curves.png, "
                "summary.txt, checkpoint.pt, best_student.pt")


def _refuse_unusable(cfg: TrainConfig, info: DistInfo) -> None:
    if cfg.amp == "fp16" and info.device.type == "cpu":
        raise UserError("--amp fp16 on CPU: float16 autocast has no fast CPU kernels (a ResNet-18 "
                        "step takes about 100x longer than in fp32); use --amp bf16 or --amp off")
    if cfg.cuda_graphs == "on" and info.device.type != "cuda":
        raise UserError(f"--cuda-graphs on needs a CUDA device (this run is on {info.device}); "
                        "use --cuda-graphs off")
    if cfg.overlap == "on" and info.device.type != "cuda":
        raise UserError(f"--overlap on needs a CUDA device (this run is on {info.device}); use "
                        "--overlap auto or off")


def execute(cfg: TrainConfig, info: DistInfo, *, state: dict[str, Any] | None, progress: bool,
            data: Any = None, stream: TextIO | None = None,
            digits_changes: list[str] | None = None, dataset: str | None = None,
            notes: list[str] | None = None) -> int:
    """Build, (restore,) train and report one run; returns the exit status.

    ``dataset``: the data set actually used (the digits fallback resolved), written into the
    folder name and config.yaml; ``notes``: lines printed after the run's header (resume).
    """
    # amp / channels_last auto, resolved before the loggers record the configuration (build_run
    # would resolve them too; it finds them resolved); the note says what auto chose
    speed_note = apply_speed_defaults(cfg, info.device.type).note
    _use_threads(cfg)
    _refuse_unusable(cfg, info)
    if cfg.out is None:
        cfg.out = default_out(cfg, dataset or cfg.dataset or "auto")
    new_folder = not Path(cfg.out).exists()
    out = prepare_output(cfg, info, resuming=state is not None)
    loggers = None
    try:
        if info.is_main:  # optional loggers first: a missing package fails before any work
            try:
                loggers = ExternalLoggers(out, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                          project=cfg.wandb_project, config=cfg.to_dict(),
                                          run_name=out.name)
            except ImportError as err:
                raise UserError(str(err)) from None
        parts = build_run(cfg, info, data=data)
    except UserError:
        if new_folder and info.is_main and not any(out.iterdir()):
            out.rmdir()  # a run refused before it began leaves no empty folder behind
        raise
    if cfg.dataset is None and dataset:
        cfg.dataset = dataset  # config.yaml and the checkpoint name what was used
    status, history = EXIT_OK, None
    stop = StopRequest()
    try:
        if state is not None:
            try:
                restore_parts(parts, state)
            except CheckpointError as err:
                raise UserError(str(err)) from None
        if info.is_main:
            save_yaml(cfg, out / "config.yaml")
        history = RunHistory(parts, out, stream=stream, state=state, loggers=loggers)
        _announce(parts, history, digits_changes or [], speed_note)
        if state is not None:
            history.say(f"resuming after epoch {state['epoch']}"
                        + (f", step {state['step_in_epoch']} of epoch {state['epoch'] + 1}"
                           if state["step_in_epoch"] else ""))
        for note in notes or []:
            history.say(note)
        with stop:
            if (state or {}).get("finished", False):
                history.say("this run had already finished; nothing left to train (extend it "
                            f"with --resume {out} --epochs N)")
            else:
                run_loop(parts, history, stop, state, progress=progress)
    except Interrupted:
        history.say(f"interrupted ({stop.name}): state saved in {out / CHECKPOINT_NAME}; continue "
                    f"with python -m spacedkd_fast.train --resume {out}"
                    + (f" under the same torchrun launch ({info.world_size} processes, or another "
                       "number: the resume says what changes), or re-run a command that has "
                       "--resume auto" if info.enabled else ""))
        status = stop.exit_status
    except NonFiniteLossError as err:
        history.say(nonfinite_text(err, steps_per_epoch=parts.steps_per_epoch,
                                   last_epoch=history.rows[-1]["epoch"] if history.rows else 0,
                                   checkpoint=out / CHECKPOINT_NAME, amp=cfg.amp))
        status = EXIT_NONFINITE
    except (WriteError, OSError) as err:
        if not isinstance(err, WriteError) and err.errno not in WRITE_ERRNOS:
            raise
        status = _write_failed(err, history, out)
    finally:
        parts.distiller.close()
        parts.data.close()
        if loggers is not None:
            loggers.close()
    if status == EXIT_OK:
        try:
            _final_report(parts, history)
        except (WriteError, OSError) as err:
            if not isinstance(err, WriteError) and err.errno not in WRITE_ERRNOS:
                raise
            status = _write_failed(err, history, out)
        barrier(info)
    # otherwise no collective: after a non-finite loss on one rank the others may be waiting
    # in a gradient all-reduce; the exit status makes torchrun stop them
    return status


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


def _write_failed(err: OSError, history: RunHistory | None, out: Path) -> int:
    """A file of the run could not be written: say which and what is kept (one line)."""
    text = str(err) if isinstance(err, WriteError) else (
        f"cannot write {err.filename or out}: {err.strerror or err}")
    kept = (f"; {out / CHECKPOINT_NAME} holds the last good checkpoint"
            if history is not None and history.rows else "")
    print(f"error: {text}{kept}. Free some space (or restore write access) and continue with "
          f"python -m spacedkd_fast.train --resume {out}", file=sys.stderr, flush=True)
    return EXIT_WRITE_FAILED


def _threads_text() -> str:
    n = torch.get_num_threads()
    return f"{n} CPU thread" + ("s" if n != 1 else "")


def _use_threads(cfg: TrainConfig) -> None:
    # cfg.threads is settled (a number) by apply_speed_defaults (train/threads.py says how)
    torch.set_num_threads(cfg.threads)


def train(cfg: TrainConfig, *, progress: bool = True, data: Any = None,
          stream: TextIO | None = None, resume: str | None = None) -> int:
    """Run ``cfg`` from scratch; returns the exit status (0 ok, 3 non-finite loss, 4 a file could
    not be written, 130/143 stopped by SIGINT/SIGTERM with the state saved).

    ``resume="auto"``: a command that can be run again (by a scheduler's requeue, by torchrun
    restarting its workers): when ``cfg.out`` holds a checkpoint of the same configuration the run
    continues from it, when it holds none the run starts, and a differing configuration or an
    unreadable checkpoint is refused (``UserError``, one line). Every rank takes the same decision.
    ``data``: a prebuilt ``DataBundle`` (tests inject tiny or poisoned data this way).
    """
    check_runnable(cfg)
    if resume not in (None, AUTO):
        raise UserError(f"resume={resume!r}: train() continues a run with resume='auto' only; "
                        "use runner.resume(OUT) for a named folder")
    if resume == AUTO and cfg.out is None:
        raise UserError("--resume auto needs --out DIR: the folder in which a re-run of the same "
                        "command finds its run")
    info = init_distributed(cfg.device)
    threads = torch.get_num_threads()  # the caller's, given back after the run
    try:
        dataset = resolve_dataset(cfg) if data is None else (cfg.dataset or data.name)
        # injected data (tests) is already built: its batch size is the caller's business
        changes = apply_dataset_defaults(cfg, dataset) if data is None else []
        state = agreed_checkpoint(cfg.out, info) if resume == AUTO else None
        if state is not None:
            if cfg.dataset is None:
                cfg.dataset = dataset  # as the run recorded it
            given = {k: v for k, v in cfg.to_dict().items() if k != "out"}
            resumed, notes = resume_plan(state, cfg.out, given, auto=True)
            notes += refit_threads(resumed, state, info, given)
            return execute(resumed, info, state=state, progress=progress, data=data,
                           stream=stream, notes=resume_notes(state, info) + notes)
        return execute(cfg, info, state=None, progress=progress, data=data, stream=stream,
                       digits_changes=changes, dataset=dataset)
    finally:
        torch.set_num_threads(threads)
        cleanup(info)


def resume(out: str | os.PathLike, *, overrides: dict[str, Any] | None = None,
           progress: bool = True, data: Any = None, stream: TextIO | None = None) -> int:
    """Continue the run in ``out`` from its checkpoint with its saved configuration (extended
    when ``overrides`` raises ``epochs``)."""
    try:
        state = load_checkpoint(out)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    cfg, notes = resume_plan(state, out, overrides)
    info = init_distributed(cfg.device)
    notes += refit_threads(cfg, state, info, overrides)
    threads = torch.get_num_threads()  # the caller's, given back after the run
    try:
        status = execute(cfg, info, state=state, progress=progress, data=data, stream=stream,
                         notes=resume_notes(state, info) + notes)
        return status
    finally:
        torch.set_num_threads(threads)
        cleanup(info)
