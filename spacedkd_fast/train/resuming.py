"""Which checkpoint a resume continues from and with which configuration.

``resume_plan`` checks a resume's flags against the saved configuration (extension of ``epochs``
allowed, anything that changes the computation refused); ``agreed_checkpoint`` is ``--resume
auto``'s choice, the same on every rank; ``resume_notes`` says what a checkpoint written under other
circumstances (another number of processes, another package version) changes. The runner
(:mod:`.runner`) calls them before it builds the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .. import __version__
from . import resume_policy
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .config import ConfigError, TrainConfig, from_dict
from .distributed import DistInfo
from .errors import UserError
from .speed_defaults import AUTO as SPEED_AUTO
from .speed_defaults import SPEED_AUTO_KEYS
from .threads import settled_threads

# Flags given together with --resume that do not change what is computed.
RESUME_SAFE = set(resume_policy.RESUME_SAFE)


def _position(state: dict[str, Any]) -> tuple:
    """What identifies one checkpoint of a run (every rank must find the same one)."""
    return (int(state["epoch"]), int(state["step_in_epoch"]), bool(state.get("finished")),
            float(state.get("wall_s", 0.0)))


def agreed_checkpoint(out: str | os.PathLike, info: DistInfo) -> dict[str, Any] | None:
    """The checkpoint in ``out`` that every rank continues from (rank 0 decides whether there is
    one; each rank reads it and all check that they read the same), or ``None`` for a new run."""
    path = Path(out) / CHECKPOINT_NAME
    decision: list[Any] = [False, None]  # [found, error]
    state = None
    if info.is_main and path.exists():
        try:
            state = load_checkpoint(out)
            decision = [True, None]
        except CheckpointError as err:
            decision = [False, str(err)]
    if info.enabled:
        dist.broadcast_object_list(decision, src=0)
    found, error = decision
    if error:
        raise UserError(f"{error} (--resume auto does not start over a run it cannot read; move "
                        "the folder away to start a new one)")
    if not found:
        return None
    if not info.enabled:
        return state
    mine: Any = None
    if state is None:
        try:
            state = load_checkpoint(out)
        except CheckpointError as err:
            mine = str(err)
    if mine is None and state is not None:
        mine = _position(state)
    seen: list[Any] = [None] * info.world_size
    dist.all_gather_object(seen, mine)
    for rank, other in enumerate(seen):
        if other != seen[0]:
            raise UserError(f"--resume auto: process {rank} reads another checkpoint in {out} "
                            f"than process 0 ({other} vs {seen[0]}); --out must be a folder that "
                            "every node sees (a shared filesystem)")
    return state


def resume_notes(state: dict[str, Any], info: DistInfo) -> list[str]:
    """What a resume says about a checkpoint written under other circumstances."""
    notes = []
    written = len(state["engine"])
    if written != info.world_size:
        notes.append(
            f"the checkpoint was written by {written} process(es), this run has "
            f"{info.world_size}: the global batch, the keys and the replay records carry over; "
            "BatchNorm statistics are now computed over each process's share of a batch and "
            "gradients are reduced in another order, so the run differs from here on from one "
            f"that keeps {written} (README: 'Changing the number of processes')")
    if state.get("spacedkd_fast") != __version__:
        notes.append(f"the checkpoint was written by spacedkd_fast "
                     f"{state.get('spacedkd_fast', '?')}; continuing with {__version__} (the "
                     "same checkpoint format)")
    return notes


def refit_threads(cfg: TrainConfig, state: dict[str, Any], info: DistInfo,
                  given: dict[str, Any] | None) -> list[str]:
    """A CPU run resumed with another number of processes settles its thread count anew, unless
    the command names ``--threads``; what it says about it.

    The saved count is kept on resume so that the run stays bitwise, which another number of
    processes ends anyway; kept, a 1-process run's 2 threads taken by each of 2 processes on 2
    cores would oversubscribe them (each process's OpenMP pool waits on the other's: twice as
    slow here).
    """
    written = len(state["engine"])
    if written == info.world_size or info.device.type != "cpu" or (given or {}).get("threads"):
        return []
    fresh = settled_threads(0, "cpu", info.world_size)
    if fresh == cfg.threads:
        return []
    saved, cfg.threads = cfg.threads, fresh
    return [f"CPU threads per process: {fresh}, auto for {info.world_size} process(es) (the "
            f"checkpoint's run used {saved}; --threads N sets it)"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_plan(state: dict[str, Any], out: str | os.PathLike,
                overrides: dict[str, Any] | None, *, auto: bool = False
                ) -> tuple[TrainConfig, list[str]]:
    """The configuration a resume continues with, and what it says about it.

    Flags equal to the saved values are accepted; ``epochs`` may grow (the run is extended: the
    LR schedule is rebuilt for the new total and continues from the current step); anything else
    that would change the computation is refused. ``auto``: the overrides are a whole command's
    configuration (``--resume auto``), and the refusal says so.
    """
    try:
        saved = from_dict(dict(state["config"]))
    except ConfigError as err:
        raise UserError(f"cannot resume: the configuration in {Path(out) / CHECKPOINT_NAME} "
                        f"(written by spacedkd_fast {state.get('spacedkd_fast', '?')}) does not "
                        f"read in spacedkd_fast {__version__}: "
                        f"{' '.join(str(err).split())}") from None
    cfg = from_dict({**state["config"], **(overrides or {}), "out": str(out)})
    for k in SPEED_AUTO_KEYS:  # the saved value is what auto resolved to when the run started
        if getattr(cfg, k) == SPEED_AUTO:
            setattr(cfg, k, getattr(saved, k))
    if not cfg.threads:  # auto: the saved count (a run from before --threads settles it anew)
        cfg.threads = saved.threads
    changed = [k for k in (overrides or {}) if k not in RESUME_SAFE | {"epochs"}
               and getattr(cfg, k) != getattr(saved, k)]
    if changed:
        what = ", ".join(f"{_flag(k)} (saved {getattr(saved, k)!r}, given {getattr(cfg, k)!r})"
                         for k in changed)
        if auto:
            raise UserError(f"--resume auto: {out} holds a run of another configuration: {what}; "
                            "give the same settings to continue it, or another --out for a new "
                            "run")
        raise UserError(f"--resume continues with the saved configuration; {what} cannot change "
                        "on resume (start a new run with --out instead)")
    notes: list[str] = []
    if cfg.epochs == saved.epochs:
        return cfg, notes
    done = int(state["epoch"])
    if cfg.epochs < saved.epochs:
        raise UserError(f"--epochs {cfg.epochs}: a resume can extend a run, not shorten it "
                        f"(planned {saved.epochs}, {done} done)")
    if saved.mode == "offline" and done >= saved.epochs:
        raise UserError("--epochs: an offline run cannot be extended once its teacher phase is "
                        "done (the student trains against the final teacher)")
    notes.append(f"extending the run from {saved.epochs} to {cfg.epochs} epochs")
    if state.get("finished"):
        if cfg.mode in ("spaced", "spaced-self"):
            notes.append("the run had finished: its end of training already replayed (or, with "
                         "the official switch, dropped) the batches after its last interval, so "
                         f"the extended run differs from one planned for {cfg.epochs} epochs from "
                         "the start in those batches")
        state["finished"] = False
        for engine in state["engine"]:  # the engine's end of training becomes a mid-run point
            engine["finished"] = False
    if cfg.schedule != "constant" or cfg.warmup_epochs:
        last_lr = state["metrics"][-1]["lr"] if state["metrics"] else None
        notes.append(f"the {cfg.schedule} learning-rate schedule is re-planned for {cfg.epochs} "
                     f"epochs from epoch {done + 1} on" + (f" (lr was {last_lr:.4g} after epoch "
                                                            f"{done})" if last_lr else ""))
    return cfg, notes
