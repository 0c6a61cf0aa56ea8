"""Checkpoints that survive a crash at any instant, and the resume that reads them back.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then
renamed over the previous one (``os.replace`` is atomic on POSIX and Windows), and the folder is
fsync'ed so that the rename itself is durable. A run killed at any point therefore leaves either the
previous complete checkpoint or the new complete one, never a torn file.

Layout of an output folder: ``checkpoint.pt`` (everything needed to resume), ``best_student.pt``
(the student's weights at its best test top-1, for use elsewhere).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..engine.model_io import unwrap
from .errors import CheckpointError, resume_folder_error  # torch-free for the CLI; re-exported

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best_student.pt"
FORMAT = "spacedkd_fast-checkpoint"
FORMAT_VERSION = 1
PAYLOAD_TYPES = {"config": dict, "epoch": int, "step_in_epoch": int, "models": dict,
                 "optimizers": dict, "schedulers": dict, "engine": list, "rng": list,
                 "metrics": list}
REQUIRED_KEYS = ("format", "version", "config", "epoch", "step_in_epoch", "models", "optimizers",
                 "schedulers", "engine", "rng", "metrics")




class WriteError(OSError):
    """A file of the run could not be written (disk full, permission lost); the previous version
    of the file, if any, is untouched. The message names the file, the bytes needed and the free
    space."""


class _ByteCounter:
    """A write-only file that keeps nothing: how many bytes ``torch.save`` would write."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, data) -> int:
        self.n += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _write_error(obj: Any, path: Path, err: BaseException) -> WriteError:
    counter = _ByteCounter()
    try:
        torch.save(obj, counter)
        needed = f"{counter.n / 1e6:.1f} MB"
    except Exception:  # noqa: BLE001 - the size is a courtesy; the failure itself is the news
        needed = "?"
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.1f} MB"
    except OSError:
        free = "?"
    reason = (err.strerror if isinstance(err, OSError) and err.strerror
              else str(err).splitlines()[0] if str(err) else type(err).__name__)
    return WriteError(f"cannot write {path}: {reason} (needs {needed}, {free} free on that "
                      "filesystem); the previous version of the file is kept")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows); the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` such that ``path`` is always either the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        raise _write_error(obj, path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from (as tensors and ints)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "state": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["key"], np_state["state"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(out_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (see ``REQUIRED_KEYS``) as ``OUT/checkpoint.pt`` atomically."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **payload}
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    path = Path(out_dir) / CHECKPOINT_NAME
    atomic_save(payload, path)
    return path


def checkpoint_payload(parts, history, position, *, engines: list[Any], rngs: list[Any]
                       ) -> dict[str, Any]:
    """What ``checkpoint.pt`` holds for a run (``parts``: a ``RunParts``; ``history``: its
    ``RunHistory``; ``position``: where the loop stands; ``engines``/``rngs``: every rank's)."""
    models = {"student": unwrap(parts.student).state_dict()}
    optimizers = {"student": parts.student_opt.state_dict()}
    schedulers = {"student": parts.student_sched.state_dict()}
    if parts.teacher is not None:
        models["teacher"] = unwrap(parts.teacher).state_dict()
    if parts.teacher_opt is not None:  # a frozen teacher has none
        optimizers["teacher"] = parts.teacher_opt.state_dict()
        schedulers["teacher"] = parts.teacher_sched.state_dict()
    return {
        "config": parts.cfg.to_dict(), "epoch": position.epoch,
        "step_in_epoch": position.step_in_epoch, "finished": position.finished,
        "world_size": parts.info.world_size,
        "models": models, "optimizers": optimizers, "schedulers": schedulers,
        "engine": engines, "rng": rngs,
        "grad_scaler": None if parts.scaler is None else parts.scaler.state_dict(),
        "metrics": history.rows, "best": dict(history.best),
        "epoch_sums": position.sums.state(), "epoch_images": position.images,
        "epoch_wall": position.wall, "wall_s": history.wall(),
        "torch": str(torch.__version__), "spacedkd_fast": __version__,
    }


def restore_parts(parts, state: dict[str, Any]) -> None:
    """Load a checkpoint's models, optimisers, schedules, engine, scaler and RNGs into ``parts``
    (built from the same configuration); ``CheckpointError`` when it cannot fit.

    A checkpoint written by another number of processes is accepted: the engine state of each new
    rank is rebuilt (:mod:`.reshard`), and a rank that did not exist takes rank 0's RNG states
    (the keyed data draws none of them)."""
    rank, world = parts.info.rank, parts.info.world_size
    engines = state["engine"]
    if state.get("world_size", len(engines)) != len(engines):
        raise CheckpointError(f"cannot resume: the checkpoint says {state['world_size']} "
                              f"process(es) wrote it but holds the state of {len(engines)} (it "
                              "is inconsistent); start a new run")
    if len(engines) != world:
        from .reshard import engine_state_for

        engine = engine_state_for(engines, parts.source, rank, world)
    else:
        engine = engines[rank]
    steps = [("the student's weights",
              lambda: unwrap(parts.student).load_state_dict(state["models"]["student"]))]
    if parts.teacher is not None:
        steps.append(("the teacher's weights",
                      lambda: unwrap(parts.teacher).load_state_dict(state["models"]["teacher"])))
    # the engine first: it recreates the projector's param group in the student optimiser
    steps += [("the distiller's state", lambda: parts.distiller.load_state_dict(engine)),
              ("the student's optimiser", lambda: parts.student_opt.load_state_dict(
                  state["optimizers"]["student"])),
              ("the student's learning-rate schedule", lambda: parts.student_sched.load_state_dict(
                  state["schedulers"]["student"]))]
    if parts.teacher_opt is not None:
        steps += [("the teacher's optimiser", lambda: parts.teacher_opt.load_state_dict(
                      state["optimizers"]["teacher"])),
                  ("the teacher's learning-rate schedule",
                   lambda: parts.teacher_sched.load_state_dict(state["schedulers"]["teacher"]))]
    if parts.scaler is not None and state.get("grad_scaler") is not None:
        steps.append(("the gradient scaler", lambda: parts.scaler.load_state_dict(
            state["grad_scaler"])))
    for what, load in steps:
        try:
            load()
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise CheckpointError(
                f"cannot resume: {what} in the checkpoint (written by spacedkd_fast "
                f"{state.get('spacedkd_fast', '?')}) do not fit what spacedkd_fast {__version__} "
                f"builds from its configuration ({_first_line(err)}); resume it with that "
                "version, or start a new run") from None
    rngs = state["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])


def _first_line(err: BaseException, limit: int = 160) -> str:
    """An exception's own words, first line only and short (missing keys list every key)."""
    text = str(err).strip().strip("'\"").splitlines()
    line = text[0] if text else "no detail"
    return line if len(line) <= limit else line[:limit - 3] + "..."


def what_the_file_is(path: Path) -> str:
    """A file ``torch.load`` could not read, described by its bytes (for the one-line error)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    ours = "a spacedkd_fast checkpoint is a PyTorch zip file"
    if size == 0:
        return f"is empty (0 bytes), not a checkpoint ({ours})"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return (f"is truncated: a PyTorch file cut short at {size} bytes (its end is "
                    "missing; checkpoints are written whole and renamed into place, so it was "
                    "cut after it was written, e.g. by an incomplete copy)")
        return (f"is damaged: a PyTorch file of {size} bytes whose contents do not read back "
                "(e.g. flipped bytes after it was written)")
    if head[:1] == b"\x80":  # a bare pickle: torch.save before PyTorch 1.6, or pickle.dump
        return f"is a pickle in an old PyTorch format, not a checkpoint of this package ({ours})"
    text = head.decode("utf-8", errors="replace")
    if len(head) == 256:  # the read may have cut the last character in two
        text = text.rstrip("\ufffd")
    if any(not (c.isprintable() or c in "\t\r\n") or c == "\ufffd" for c in text):
        return f"is not a checkpoint of this package: not a PyTorch file ({ours})"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"is a text file (it begins {first!r}), not a checkpoint of this package ({ours})"


def _what_the_object_is(payload: Any) -> str:
    if isinstance(payload, dict) and "state_dict" in payload and "arch" in payload:
        return ("holds a model's weights only (a best_student.pt), not a training checkpoint of "
                "this package")
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor)
                                                     for v in payload.values()):
        return "holds a model's state_dict, not a training checkpoint of this package"
    kind = "a dictionary" if isinstance(payload, dict) else f"a {type(payload).__name__}"
    return f"is a PyTorch file holding {kind}, not a training checkpoint of this package"


def load_checkpoint(out_dir: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read ``OUT/checkpoint.pt``; ``CheckpointError`` when it is missing, corrupt or foreign."""
    folder = Path(out_dir)
    missing = resume_folder_error(folder)
    if missing is not None:
        raise missing
    path = folder / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint in {folder} (expected {path}; a run "
                              "writes it at the end of its first epoch)")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: the error says it
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as err:
        if zipfile.is_zipfile(path) and "unsupported global" in str(err).lower():
            raise CheckpointError(f"cannot resume: {path} holds Python objects that a checkpoint "
                                  "of this package never contains (not written by "
                                  "spacedkd_fast)") from None
        raise CheckpointError(f"cannot resume: {path} {what_the_file_is(path)}") from None
    except Exception:  # noqa: BLE001 - damaged bytes make the unpickler raise anything
        # (IndexError, KeyError, UnicodeDecodeError, ... besides the usual I/O and zip errors):
        # the bytes say what the file is better than the exception does
        raise CheckpointError(f"cannot resume: {path} {what_the_file_is(path)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"cannot resume: {path} {_what_the_object_is(payload)}")
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"cannot resume: {path} has format version {payload.get('version')} "
                              f"(written by spacedkd_fast {payload.get('spacedkd_fast', '?')}); "
                              f"spacedkd_fast {__version__} reads version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"cannot resume: {path} lacks {', '.join(missing)}")
    wrong = [k for k, kind in PAYLOAD_TYPES.items() if not isinstance(payload[k], kind)]
    if wrong:
        raise CheckpointError(f"cannot resume: {path} is damaged ({', '.join(wrong)} of the wrong "
                              "type)")
    return payload


def save_best_student(out_dir: str | Path, *, state_dict: dict[str, torch.Tensor], arch: str,
                      num_classes: int, image_size: int, epoch: int, top1: float) -> Path:
    """Keep the student's weights at its best test accuracy apart from the resume checkpoint.

    Load with ``create(arch, num_classes, image_size)`` then ``load_state_dict(ckpt["state_dict"])``.
    """
    path = Path(out_dir) / BEST_NAME
    atomic_save({"arch": arch, "num_classes": num_classes, "image_size": image_size,
                 "epoch": epoch, "top1": top1, "state_dict": state_dict}, path)
    return path
