"""One training run: build data, models, optimisers and the distiller from a ``TrainConfig``,
loop over epochs, evaluate, report, checkpoint, resume.

Everything a library user would need to re-implement lives in the library (the step logic in
:mod:`spacedkd_fast.engine.distill`, batches in :mod:`spacedkd_fast.data`); this module only wires it and
keeps the books.

Exactness of resume: checkpoints are taken at epoch boundaries (and mid-epoch on SIGINT); they hold
models, optimisers, schedules, the engine's state (pending replay keys), the gradient scaler, every
RNG state, the epoch's loss sums and the metric rows. Batches come from the keyed source, so the
epoch after a resume sees exactly the batches it would have seen. Loss accumulators are read at
steps ``n`` with ``n % log_every == 0`` (never at clock-dependent moments), so the per-epoch means
are computed in the same order too.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import __version__
from .checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_best_student,
    save_checkpoint,
    set_rng_state,
)
from .config import TrainConfig, apply_dataset_defaults, from_dict, save_yaml
from .distributed import (
    DistInfo,
    average_gradients_of,
    barrier,
    cleanup,
    init_distributed,
    unwrap,
    wrap_ddp,
)
from .evaluate import evaluate
from .lr_schedule import StepSchedule
from .report import (
    ExternalLoggers,
    MetricsLog,
    ProgressBar,
    plot_curves,
    read_metrics,
    summary_table,
)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OVERLAP = {"auto": "auto", "on": True, "off": False}


class UserError(RuntimeError):
    """Input the run cannot use (unknown model or data set, unwritable folder, ...)."""


class Interrupted(Exception):
    """SIGINT arrived; raised at a point where the state is consistent."""


# ------------------------------------------------------------------------------ small helpers
def _say(msg: str, info: DistInfo | None = None, stream: TextIO | None = None) -> None:
    if info is None or info.is_main:
        print(msg, file=stream or sys.stdout, flush=True)


def _resolve_dataset(cfg: TrainConfig) -> str:
    """The data set the run will use (``None`` -> cifar100 when on disk, else digits)."""
    if cfg.dataset:
        return cfg.dataset
    from ..data.datasets import cifar_present

    return "cifar100" if cifar_present(cfg.data_dir, 100) else "digits"


def _self_arch(name: str) -> str:
    """Self KD trains a multi-exit network: ``resnet18`` means ``byot_resnet18``."""
    from ..models import list_models

    if not name.startswith("byot_") and f"byot_{name}" in list_models():
        return f"byot_{name}"
    return name


def _n_params(model: nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                   ) -> StepSchedule:
    return StepSchedule(opt, kind=cfg.schedule, peak_lr=cfg.lr,
                        total_steps=cfg.epochs * steps_per_epoch,
                        warmup_steps=int(round(cfg.warmup_epochs * steps_per_epoch)),
                        min_lr=cfg.min_lr,
                        milestones=[int(round(m * steps_per_epoch)) for m in cfg.milestones],
                        gamma=cfg.gamma)


class _EpochSums:
    """Loss means of one epoch, from the engine's ``pop_stats`` means weighted by step counts."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.sums: dict[str, float] = dict((state or {}).get("sums", {}))
        self.counts: dict[str, int] = dict((state or {}).get("counts", {}))

    def add(self, popped: dict[str, float], teacher_steps: int, student_steps: int) -> None:
        for key, mean in popped.items():
            weight = teacher_steps if key == "teacher_loss" else student_steps
            if weight <= 0 or mean is None:
                continue
            self.sums[key] = self.sums.get(key, 0.0) + mean * weight
            self.counts[key] = self.counts.get(key, 0) + weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts.get(k)}

    def state(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}


class _SigintFlag:
    """First Ctrl-C asks the run to save and stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> _SigintFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True
        print("\ninterrupt: saving a checkpoint after the current step (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ------------------------------------------------------------------------------ the run
class Run:
    """A training run in an output folder; ``execute()`` returns the process exit status."""

    def __init__(self, cfg: TrainConfig, *, info: DistInfo, resume_state: dict[str, Any] | None,
                 progress: bool, data: Any = None, stream: TextIO | None = None) -> None:
        self.cfg, self.info, self.resume_state = cfg, info, resume_state
        self.progress, self.stream = progress, stream or sys.stdout
        self.injected_data = data
        self.device = info.device
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        self.rows: list[dict[str, Any]] = []
        self.best = {"top1": None, "epoch": None}
        self.wall_before = 0.0
        self.sigint = _SigintFlag()

    # -- setup --------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        _say(msg, self.info, self.stream)

    def prepare_output(self) -> Path:
        cfg = self.cfg
        if cfg.out is None:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            data = (cfg.dataset or "auto").replace("folder:", "").replace("/", "_")
            cfg.out = f"runs/{stamp}-{cfg.mode}-{cfg.student}-{data}"
        error = None
        if self.info.is_main:
            out = Path(cfg.out)
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                error = f"--out {out}: cannot write there ({err.strerror or err})"
            if error is None and self.resume_state is None and (out / CHECKPOINT_NAME).exists():
                error = (f"{out} already holds a run (checkpoint.pt); continue it with --resume "
                         f"{out} or choose another --out")
        if self.info.enabled:
            box = [error, cfg.out]
            dist.broadcast_object_list(box, src=0)
            error, cfg.out = box
        if error:
            raise UserError(error)
        return Path(cfg.out)

    def seed_everything(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def build_data(self):
        cfg = self.cfg
        if self.injected_data is not None:
            return self.injected_data
        from ..data import build_data

        try:
            return build_data(cfg.dataset, data_dir=cfg.data_dir, recipe=cfg.augment,
                              batch_size=cfg.batch_size, seed=cfg.seed, device=str(self.device),
                              backend=cfg.data_backend, rank=self.info.rank,
                              world_size=self.info.world_size, image_size=cfg.image_size)
        except FileNotFoundError as err:
            raise UserError(str(err)) from None
        except ValueError as err:
            raise UserError(f"data: {err}") from None

    def build_model(self, name: str, extra: dict[str, Any]) -> nn.Module:
        from ..models import create

        kwargs = {**self.cfg.model_kwargs, **extra}
        try:
            model = create(name, self.data.num_classes, self.data.image_size, **kwargs)
        except (ValueError, TypeError) as err:
            raise UserError(f"model {name!r}: {err}") from None
        model = model.to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def build(self) -> None:
        cfg, info = self.cfg, self.info
        self.seed_everything()
        self.data = self.build_data()
        self.source = self.data.train
        if self.cfg.channels_last:
            self.source = ChannelsLastSource(self.source)
        self.L = int(self.source.steps_per_epoch)
        # models under the run's seed: teacher first, then student (fixed order = fixed weights)
        torch.manual_seed(cfg.seed)
        self.teacher: nn.Module | None = None
        if cfg.is_self:
            self.student = self.build_model(_self_arch(cfg.arch), cfg.student_kwargs)
        else:
            if cfg.mode != "base":
                self.teacher = self.build_model(cfg.teacher, cfg.teacher_kwargs)
            self.student = self.build_model(cfg.student, cfg.student_kwargs)
        if cfg.compile:
            for m in (self.teacher, self.student):
                if m is not None:
                    m.compile()
        if self.teacher is not None:
            self.teacher = wrap_ddp(self.teacher, info)
        self.student = wrap_ddp(self.student, info)

        self.teacher_opt = (build_optimizer(self.teacher.parameters(), cfg)
                            if self.teacher is not None else None)
        self.student_opt = build_optimizer(self.student.parameters(), cfg)
        self.teacher_sched = (build_schedule(self.teacher_opt, cfg, self.L)
                              if self.teacher_opt is not None else None)
        self.student_sched = build_schedule(self.student_opt, cfg, self.L)
        self.scaler = (torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None)
        trace = cfg.trace
        if trace and info.rank > 0:
            trace = f"{trace}.rank{info.rank}"
        common = dict(steps_per_epoch=self.L, flush_tail=cfg.flush_tail, trace=trace,
                      source=self.source, amp_dtype=self.amp_dtype, grad_scaler=self.scaler,
                      check_finite=True, on_student_epoch_end=self._on_student_epoch_end)
        try:
            if cfg.is_self:
                from ..engine.distill import SelfDistiller

                self.distiller = SelfDistiller(
                    self.student, self.student_opt, mode=cfg.mode, interval_rate=cfg.interval_rate,
                    temperature=cfg.temperature, alpha=cfg.alpha, beta=cfg.beta,
                    kd_scale=cfg.temperature ** 2 if cfg.kd_scale is None else cfg.kd_scale,
                    self_kd_first_replay=cfg.self_kd_first_replay,
                    self_kd_feature_exits=cfg.self_kd_feature_exits,
                    scheduler=self.student_sched, **common)
            else:
                from ..engine.distill import SpacedDistiller

                self.distiller = SpacedDistiller(
                    self.teacher, self.student, self.teacher_opt, self.student_opt, mode=cfg.mode,
                    interval_rate=cfg.interval_rate, loss=self._kd_loss(), beta=cfg.beta,
                    feature_loss=cfg.feature_loss, teacher_bn_update=cfg.teacher_bn_update,
                    replay=cfg.replay, overlap=OVERLAP[cfg.overlap],
                    teacher_scheduler=self.teacher_sched, student_scheduler=self.student_sched,
                    projector_seed=cfg.seed, **common)
        except (NotImplementedError, ValueError) as err:
            raise UserError(str(err)) from None
        projector = getattr(self.distiller, "projector", None)
        if projector is not None:
            average_gradients_of(projector, info)

    def _kd_loss(self):
        cfg = self.cfg
        if cfg.mode == "base":
            return None
        from ..ops.objective import KDObjective

        return KDObjective(temperature=cfg.temperature, alpha=cfg.alpha, kd_scale=cfg.kd_scale,
                           kind="paper-code" if cfg.kd_loss == "paper-code" else "kl")

    # -- checkpoints --------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (on every rank)."""
        if not self.info.enabled:
            return [obj]
        out: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(out, obj)
        return out

    def save(self, *, epoch: int, step_in_epoch: int, epoch_sums: _EpochSums,
             epoch_images: int, epoch_wall: float, finished: bool) -> None:
        engines = self._gather(self.distiller.state_dict())
        rngs = self._gather(rng_state())
        if not self.info.is_main:
            return
        models = {"student": unwrap(self.student).state_dict()}
        optimizers = {"student": self.student_opt.state_dict()}
        schedulers = {"student": self.student_sched.state_dict()}
        if self.teacher is not None:
            models["teacher"] = unwrap(self.teacher).state_dict()
            optimizers["teacher"] = self.teacher_opt.state_dict()
            schedulers["teacher"] = self.teacher_sched.state_dict()
        save_checkpoint(self.out, {
            "config": self.cfg.to_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
            "finished": finished, "world_size": self.info.world_size,
            "models": models, "optimizers": optimizers, "schedulers": schedulers,
            "engine": engines, "rng": rngs,
            "grad_scaler": None if self.scaler is None else self.scaler.state_dict(),
            "metrics": self.rows, "best": dict(self.best),
            "epoch_sums": epoch_sums.state(), "epoch_images": epoch_images,
            "epoch_wall": epoch_wall, "wall_s": self.wall_before + self.elapsed(),
            "torch": str(torch.__version__), "spacedkd_fast": __version__,
        })

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("world_size", 1) != self.info.world_size:
            raise UserError(f"the checkpoint was written by {state.get('world_size', 1)} "
                            f"process(es); resume it with as many (got {self.info.world_size})")
        unwrap(self.student).load_state_dict(state["models"]["student"])
        if self.teacher is not None:
            unwrap(self.teacher).load_state_dict(state["models"]["teacher"])
        # the engine first: it recreates the projector's param group in the student optimiser
        self.distiller.load_state_dict(state["engine"][self.info.rank])
        self.student_opt.load_state_dict(state["optimizers"]["student"])
        self.student_sched.load_state_dict(state["schedulers"]["student"])
        if self.teacher is not None:
            self.teacher_opt.load_state_dict(state["optimizers"]["teacher"])
            self.teacher_sched.load_state_dict(state["schedulers"]["teacher"])
        if self.scaler is not None and state.get("grad_scaler") is not None:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.rows = list(state["metrics"])
        self.best = dict(state["best"])
        self.wall_before = float(state.get("wall_s", 0.0))
        set_rng_state(state["rng"][self.info.rank])

    # -- evaluation and rows ------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def _sync_buffers(self, model: nn.Module) -> None:
        # DDP broadcasts rank 0's buffers at each forward, then every rank updates its own BN
        # statistics with its own share: evaluate all ranks with rank 0's (what is saved).
        if self.info.enabled:
            with torch.no_grad():
                for b in unwrap(model).buffers():
                    dist.broadcast(b, src=0)

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        self._sync_buffers(model)
        return evaluate(model, self.data.test(), device=self.device, amp_dtype=self.amp_dtype,
                        channels_last=self.cfg.channels_last, info=self.info)

    def evaluate_row(self, epoch: int, phase: str, sums: _EpochSums, images: int,
                     epoch_wall: float, teacher_metrics: dict[str, float] | None = None
                     ) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch, "phase": phase}
        if self.cfg.is_self:
            m = self._evaluate(self.student)
            exits = sorted(k for k in m if k.startswith("exit") and k.endswith("_top1"))
            deepest = exits[-1].removesuffix("_top1") if exits else None
            row["teacher_top1"] = m.get(f"{deepest}_top1") if deepest else None
            row["teacher_top5"] = m.get(f"{deepest}_top5") if deepest else None
            row["student_top1"], row["student_top5"] = m["top1"], m["top5"]
            row.update({k: v for k, v in m.items() if k.startswith(("exit", "ensemble"))})
        else:
            if self.teacher is not None:
                tm = teacher_metrics if teacher_metrics is not None else self._evaluate(self.teacher)
                row["teacher_top1"], row["teacher_top5"] = tm["top1"], tm["top5"]
            else:
                row["teacher_top1"] = row["teacher_top5"] = None
            sm = self._evaluate(self.student)
            row["student_top1"], row["student_top5"] = sm["top1"], sm["top5"]
        means = sums.means()
        row["teacher_loss"] = means.get("teacher_loss")
        row["student_loss"] = means.get("student_loss")
        for key in ("ce", "kl", "feat"):
            if key in means:
                row[key] = means[key]
        row["lr"] = (self.teacher_opt or self.student_opt).param_groups[0]["lr"]
        row["student_lr"] = self.student_opt.param_groups[0]["lr"]
        row["teacher_steps"] = self.distiller.teacher_steps
        row["student_steps"] = self.distiller.student_steps
        row["images_per_s"] = images / epoch_wall if epoch_wall > 0 else None
        row["epoch_s"] = epoch_wall
        row["wall_s"] = self.wall_before + self.elapsed()
        return row

    def record_row(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if row.get("student_top1") is not None and (self.best["top1"] is None
                                                    or row["student_top1"] > self.best["top1"]):
            self.best = {"top1": row["student_top1"], "epoch": row["epoch"]}
            if self.info.is_main:
                save_best_student(self.out, state_dict=unwrap(self.student).state_dict(),
                                  arch=_self_arch(self.cfg.arch) if self.cfg.is_self
                                  else self.cfg.student,
                                  num_classes=self.data.num_classes,
                                  image_size=self.data.image_size, epoch=row["epoch"],
                                  top1=row["student_top1"])
        if self.info.is_main:
            self.metrics.append(row)
            self.loggers.log(row)
            self.say(self._row_text(row))

    def _row_text(self, row: dict[str, Any]) -> str:
        def pct(v):
            return "   -  " if v is None else f"{100 * v:5.2f}%"

        total = self.cfg.epochs * (2 if self.cfg.mode == "offline" else 1)
        parts = [f"epoch {row['epoch']:>3}/{total}"]
        if row.get("phase") not in (None, "train"):
            parts.append(f"[{row['phase']}]")
        if self.cfg.is_self:
            exits = " ".join(pct(row.get(f"exit{i}_top1")).strip()
                             for i in range(1, 9) if row.get(f"exit{i}_top1") is not None)
            parts.append(f"exits top-1 {exits}  ensemble top-1 {pct(row['student_top1'])} "
                         f"top-5 {pct(row['student_top5'])}")
        else:
            if self.teacher is not None:
                parts.append(f"teacher top-1 {pct(row['teacher_top1'])} top-5 "
                             f"{pct(row['teacher_top5'])}")
            parts.append(f"student top-1 {pct(row['student_top1'])} top-5 "
                         f"{pct(row['student_top5'])}")
        losses = [f"{k.replace('_loss', '')} {row[k]:.4f}" for k in ("teacher_loss", "student_loss")
                  if row.get(k) is not None]
        if losses:
            parts.append("loss " + " ".join(losses))
        parts.append(f"lr {row['lr']:.3g}")
        if row.get("images_per_s"):
            parts.append(f"{row['images_per_s']:.0f} img/s")
        parts.append(f"{row['epoch_s']:.1f} s")
        return "  ".join(parts)

    # -- the loop -----------------------------------------------------------------------
    def _batches(self, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
        if start == 0:
            yield from self.source.epoch(epoch)
            return
        for i in range(start, self.L):  # mid-epoch resume: regenerate the remaining keys
            key = epoch * self.L + i + 1
            yield key, self.source.batch(key)

    def _interrupt_requested(self, at_log_point: bool) -> bool:
        if not self.info.enabled:
            return self.sigint.raised
        if not at_log_point:  # ranks agree only at the shared log points
            return False
        flag = torch.tensor([1 if self.sigint.raised else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _on_student_epoch_end(self, student_epoch: int) -> None:
        """Offline mode: the student's epochs happen inside ``finish()``; evaluate each."""
        if self.cfg.mode != "offline" or not getattr(self, "_in_finish", False):
            return
        now = time.monotonic()
        sums = _EpochSums()
        pops = self.distiller.pop_stats()
        steps = self.distiller.student_steps - self._last_student_steps
        sums.add(pops, 0, steps)
        self._last_student_steps = self.distiller.student_steps
        wall = now - self._phase_t0
        self._phase_t0 = now
        row = self.evaluate_row(self.cfg.epochs + student_epoch, "student", sums,
                                self.source_num_samples(), wall,
                                teacher_metrics=self._final_teacher_metrics)
        self.record_row(row)
        if self.sigint.raised:
            self.say("interrupted during the offline student phase, which a resume restarts from "
                     f"the teacher's final checkpoint (epoch {self.cfg.epochs})")
            raise Interrupted

    def source_num_samples(self) -> int:
        n = getattr(self.source, "num_samples", None)
        return int(n) if n is not None else self.L * self.cfg.batch_size

    def train_epochs(self) -> None:
        cfg, d = self.cfg, self.distiller
        state = self.resume_state or {}
        start_epoch = int(state.get("epoch", 0))
        start_step = int(state.get("step_in_epoch", 0))
        sums = _EpochSums(state.get("epoch_sums") if start_step else None)
        images0 = int(state.get("epoch_images", 0)) if start_step else 0
        wall0 = float(state.get("epoch_wall", 0.0)) if start_step else 0.0
        for epoch in range(start_epoch, cfg.epochs):
            first = start_step if epoch == start_epoch else 0
            if epoch != start_epoch:
                sums, images0, wall0 = _EpochSums(), 0, 0.0
            t0 = time.monotonic()
            bar = ProgressBar(self.L, f"epoch {epoch + 1}/{cfg.epochs}", stream=self.stream,
                              enabled=self.progress and self.info.is_main)
            images = images0
            done = first
            last_t, last_s = d.teacher_steps, d.student_steps
            for key, (x, y) in self._batches(epoch, first):
                d.step(key, x, y)
                done += 1
                images += x.shape[0] * self.info.world_size
                log_point = key % cfg.log_every == 0 or done == self.L
                stats = None
                if log_point:
                    stats = d.pop_stats()
                    sums.add(stats, d.teacher_steps - last_t, d.student_steps - last_s)
                    last_t, last_s = d.teacher_steps, d.student_steps
                bar.update(done, images - images0, stats=stats,
                           lr=(self.teacher_opt or self.student_opt).param_groups[0]["lr"])
                if done < self.L and self._interrupt_requested(log_point):
                    if not log_point:
                        stats = d.pop_stats()
                        sums.add(stats, d.teacher_steps - last_t, d.student_steps - last_s)
                    bar.close()
                    self.save(epoch=epoch, step_in_epoch=done, epoch_sums=sums,
                              epoch_images=images, epoch_wall=wall0 + time.monotonic() - t0,
                              finished=False)
                    raise Interrupted
            bar.close()
            last = epoch == cfg.epochs - 1
            if last and cfg.mode != "offline":
                d.finish()  # replay the tail before the final evaluation
                sums.add(d.pop_stats(), d.teacher_steps - last_t, d.student_steps - last_s)
            wall = wall0 + time.monotonic() - t0
            row = self.evaluate_row(epoch + 1, "teacher" if cfg.mode == "offline" else "train",
                                    sums, images, wall)
            self.record_row(row)
            finished = last and cfg.mode != "offline"
            self.save(epoch=epoch + 1, step_in_epoch=0, epoch_sums=_EpochSums(), epoch_images=0,
                      epoch_wall=0.0, finished=finished)
            if not last and self._interrupt_requested(True):
                raise Interrupted
        if cfg.mode == "offline" and not state.get("finished", False):
            self._final_teacher_metrics = (
                {"top1": self.rows[-1]["teacher_top1"], "top5": self.rows[-1]["teacher_top5"]}
                if self.rows else None)
            self._last_student_steps = d.student_steps
            self._phase_t0 = time.monotonic()
            self._in_finish = True
            self.say(f"offline KD: teacher done; the student now trains {cfg.epochs} epochs "
                     "against the final teacher")
            d.finish()
            self._in_finish = False
            self.save(epoch=cfg.epochs, step_in_epoch=0, epoch_sums=_EpochSums(), epoch_images=0,
                      epoch_wall=0.0, finished=True)

    # -- top level ----------------------------------------------------------------------
    def announce(self, digits_changes: list[str]) -> None:
        cfg, info = self.cfg, self.info
        self.say(self.data.announcement if getattr(self.data, "announcement", "") else
                 f"data: {self.data.name}")
        if digits_changes:
            self.say(f"digits defaults: {', '.join(digits_changes)} (the recipe's values are for "
                     "CIFAR-100; set these flags to override)")
        threads = torch.get_num_threads()
        where = (f"{self.device}" + (f" x {info.world_size} processes" if info.enabled else "")
                 + (f", {threads} CPU threads" if self.device.type == "cpu" else ""))
        self.say(f"spacedkd_fast {__version__}, torch {torch.__version__}, device {where}, "
                 f"amp {cfg.amp}, data backend {getattr(self.data, 'backend', '?')}")
        if cfg.is_self:
            models = f"network {_self_arch(cfg.arch)} ({_n_params(unwrap(self.student))})"
        elif self.teacher is None:
            models = f"model {cfg.student} ({_n_params(unwrap(self.student))})"
        else:
            models = (f"teacher {cfg.teacher} ({_n_params(unwrap(self.teacher))}) -> student "
                      f"{cfg.student} ({_n_params(unwrap(self.student))})")
        spacing = ""
        if cfg.mode in ("spaced", "spaced-self"):
            spacing = f", s={cfg.interval_rate:g} (replay every {int(self.L * cfg.interval_rate)} steps)"
        self.say(f"mode {cfg.mode}{spacing}; {models}; {self.data.num_classes} classes, "
                 f"{self.data.image_size} px; {self.L} steps/epoch x {cfg.epochs} epochs, batch "
                 f"{cfg.batch_size}, {cfg.optimizer} lr {cfg.lr:g} ({cfg.schedule})")
        self.say(f"output: {self.out}")

    def execute(self, digits_changes: list[str]) -> int:
        cfg = self.cfg
        self.out = self.prepare_output()
        self.loggers = None
        if self.info.is_main:  # optional loggers first: a missing package fails before any work
            try:
                self.loggers = ExternalLoggers(self.out, tensorboard=cfg.tensorboard,
                                               wandb=cfg.wandb, project=cfg.wandb_project,
                                               config=cfg.to_dict(), run_name=self.out.name)
            except ImportError as err:
                raise UserError(str(err)) from None
        self.build()
        if self.resume_state is not None:
            self.restore(self.resume_state)
        if self.info.is_main:
            save_yaml(cfg, self.out / "config.yaml")
            self.metrics = MetricsLog(self.out, self.rows)
        else:
            self.metrics = None
        self.announce(digits_changes)
        if self.resume_state is not None:
            s = self.resume_state
            self.say(f"resuming after epoch {s['epoch']}"
                     + (f", step {s['step_in_epoch']} of epoch {s['epoch'] + 1}"
                        if s["step_in_epoch"] else ""))
        self.t_start = time.monotonic()
        status = EXIT_OK
        try:
            with self.sigint:
                if not (self.resume_state or {}).get("finished", False):
                    self.train_epochs()
                else:
                    self.say("this run had already finished; nothing left to train")
        except Interrupted:
            self.say(f"interrupted: state saved in {self.out / CHECKPOINT_NAME}; continue with "
                     f"python -m spacedkd_fast.train --resume {self.out}")
            status = EXIT_INTERRUPTED
        except Exception as err:
            from ..engine.distill import NonFiniteLossError

            if not isinstance(err, NonFiniteLossError):
                raise
            last = self.rows[-1]["epoch"] if self.rows else 0
            kept = (f"the last good checkpoint (after epoch {last}) is kept in "
                    f"{self.out / CHECKPOINT_NAME}" if last else "no checkpoint had been written yet")
            where = f"batch key {err.key}"
            if isinstance(err.key, int):
                where = (f"step n={err.key}: epoch {(err.key - 1) // self.L + 1}, batch "
                         f"{(err.key - 1) % self.L + 1} of {self.L}")
            self.say(f"stopped: non-finite {err.role} loss at {where} ({err.role} update "
                     f"{err.step} was not applied); {kept}. Lower --lr, try --amp off, or check "
                     "the data.")
            status = EXIT_NONFINITE
        finally:
            close = getattr(self.distiller, "close", None)
            if close is not None:
                close()
            if self.loggers is not None:
                self.loggers.close()
        if status == EXIT_OK:
            self.finish_report()
            barrier(self.info)
        # otherwise no collective: after a non-finite loss on one rank the others may be waiting
        # in a gradient all-reduce; the exit status makes torchrun stop them
        return status

    def finish_report(self) -> None:
        if not self.info.is_main or not self.rows:
            return
        cfg = self.cfg
        plot_curves(self.rows, self.out / "curves.png",
                    title=f"{cfg.mode} KD, {cfg.student} on {self.data.name}")
        wall = self.wall_before + self.elapsed()
        rates = [r["images_per_s"] for r in self.rows if r.get("images_per_s")]
        if cfg.is_self:
            models = [(f"exit {i}", f"exit{i}") for i in range(1, 9)
                      if self.rows[-1].get(f"exit{i}_top1") is not None]
            models.append(("ensemble (student)", "student"))
        elif self.teacher is None:
            models = [("model", "student")]
        else:
            models = [("teacher", "teacher"), ("student", "student")]
        compare = None
        if cfg.compare:
            try:
                compare = read_metrics(cfg.compare)
            except (OSError, ValueError) as err:
                self.say(f"--compare {cfg.compare}: cannot read its metrics.jsonl ({err})")
        table = summary_table(self.rows, wall_s=wall,
                              images_per_s=float(np.mean(rates)) if rates else 0.0,
                              models=models, compare=compare,
                              compare_name=Path(cfg.compare).name if cfg.compare else "")
        (self.out / "summary.txt").write_text(table + "\n")
        self.say("\n" + table)
        self.say(f"outputs in {self.out}: metrics.jsonl, metrics.csv, config.yaml, curves.png, "
                 "summary.txt, checkpoint.pt, best_student.pt")


class ChannelsLastSource:
    """A replayable source whose batches come out in channels_last memory format."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.steps_per_epoch = inner.steps_per_epoch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @staticmethod
    def _cl(batch):
        x, y = batch
        return x.contiguous(memory_format=torch.channels_last), y

    def epoch(self, epoch: int):
        for key, batch in self.inner.epoch(epoch):
            yield key, self._cl(batch)

    def batch(self, key: int):
        return self._cl(self.inner.batch(key))


# ------------------------------------------------------------------------------ entry points
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
        changes = apply_dataset_defaults(cfg, _resolve_dataset(cfg)) if data is None else []
        run = Run(cfg, info=info, resume_state=None, progress=progress, data=data, stream=stream)
        return run.execute(changes)
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
        run = Run(cfg, info=info, resume_state=state, progress=progress, data=data, stream=stream)
        return run.execute([])
    finally:
        cleanup(info)
