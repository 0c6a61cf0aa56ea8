"""Running the student's replay of interval k while the teacher trains on interval k+1 (CUDA).

The student of interval k needs only the teacher as it stood at the end of interval k (SPEC rule
5), so its work can run on a second CUDA stream (one GPU) or on a second GPU while the teacher keeps
training. Correctness rests on three explicit orderings, none left to luck:

1. *Snapshot*: at the end of interval k the teacher's parameters AND buffers are copied into a
   preallocated snapshot module, on the teacher's stream, right after the teacher's optimizer step
   was queued there. In-stream order makes the copy read the updated weights, and makes the
   teacher's next forward (which updates BN buffers) and optimizer step write only after the copy.
   An event ``snapshot_ready`` is recorded after the copy; the student stream waits on it.
2. *Reuse of the snapshot*: before copying interval k+1 into the same snapshot, the teacher stream
   waits on ``student_done`` (recorded after the last student step of interval k), so a snapshot is
   never overwritten while the student still reads it.
3. *Memory crossing streams*: tensors made on the teacher stream and read on the student stream
   (stored batches, checksums) get ``record_stream(student_stream)`` before they are dropped, so
   the caching allocator does not hand their memory to teacher-stream work too early. Whoever reads
   student results (``join``) first makes its stream wait on the student stream.

On CPU (or with overlap off) :class:`Lanes` is inert and the engine runs the sequential order.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .model_io import unwrap


def overlap_wanted(d, overlap) -> bool:
    """Whether the pair distiller ``d`` runs overlapped. ``True``: on (refused, naming what is
    missing, when it cannot run); ``auto``: on when it can run and no loss is read on the host
    before every step (measured on an H200: with that read, overlap was 0.97x; with the read
    deferred or off, 1.19x); ``False``: off."""
    if overlap not in ("auto", True, False):
        raise ValueError(f"overlap must be 'auto', True or False, got {overlap!r}")
    devices = " and ".join(sorted({d.teacher_device.type, d.student_device.type}))
    missing = [what for what, ok in (
        ("mode 'spaced'", d.spec.replays == "interval" and d.spec.teacher),
        (f"CUDA teacher and student (they are on {devices})",
         d.teacher_device.type == "cuda" and d.student_device.type == "cuda"),
        ("teacher_bn_update=False", not d.teacher_bn_update),
        ("no grad_scaler", d.grad_scaler is None),
        ("replay='keyed'", d.replay == "keyed"),
        ("no shared optimizer", not d.shared_optimizer)) if not ok]
    if overlap is True and missing:
        raise ValueError(f"overlap=True needs {', '.join(missing)}; use overlap='auto' or "
                         "False")
    if overlap == "auto":
        return not missing and (d._deferred is not None or not d.check_finite)
    return bool(overlap)


def make_snapshot(teacher: nn.Module, device: torch.device) -> nn.Module:
    """A frozen copy of ``teacher`` on ``device`` whose BatchNorm layers use batch statistics in
    train mode without tracking running statistics (the copy never writes its buffers)."""
    snap = copy.deepcopy(unwrap(teacher)).to(device)
    snap.requires_grad_(False)
    for m in snap.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
    return snap


def copy_into_snapshot(snapshot: nn.Module, teacher: nn.Module) -> None:
    """Copy parameters and buffers of ``teacher`` into ``snapshot`` (same structure), in place,
    on the current stream."""
    src = list(unwrap(teacher).parameters()) + list(unwrap(teacher).buffers())
    dst = list(snapshot.parameters()) + list(snapshot.buffers())
    if len(src) != len(dst):
        raise RuntimeError("teacher and snapshot no longer have the same parameters and buffers")
    with torch.no_grad():
        if all(s.device == d.device for s, d in zip(src, dst)):
            torch._foreach_copy_(dst, src)
        else:
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
    snapshot.train(unwrap(teacher).training)


class Lanes:
    """Where teacher and student work is issued: one stream each (or one device each) on CUDA.

    ``enabled=False`` (CPU, or overlap off): every method is a no-op and ``student()`` is a null
    context, so the engine's code path is the same in both cases.
    """

    def __init__(self, teacher_device: torch.device, student_device: torch.device,
                 enabled: bool) -> None:
        self.enabled = bool(enabled)
        self.teacher_device = teacher_device
        self.student_device = student_device
        if not self.enabled:
            return
        if teacher_device.type != "cuda" or student_device.type != "cuda":
            raise ValueError("overlap needs CUDA devices for both teacher and student")
        self.teacher_stream = torch.cuda.current_stream(teacher_device)
        if teacher_device == student_device:
            self.student_stream = torch.cuda.Stream(device=student_device)
        else:  # a second GPU: its own current stream is free for the student
            self.student_stream = torch.cuda.current_stream(student_device)
        # Everything made so far (models, optimizer state, projector) was made on the teacher's
        # stream; the student stream must see it finished.
        self.student_stream.wait_stream(self.teacher_stream)
        self.snapshot_ready = torch.cuda.Event()
        self.student_done: torch.cuda.Event | None = None

    def student(self):
        """Context in which student work is issued."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.student_stream)

    def publish_snapshot(self, snapshot: nn.Module, teacher: nn.Module) -> None:
        """Copy the teacher into ``snapshot`` after its queued work; the student stream waits."""
        if not self.enabled:
            copy_into_snapshot(snapshot, teacher)
            return
        with torch.cuda.stream(self.teacher_stream):
            if self.student_done is not None:  # rule 2: the previous replay has finished reading
                self.teacher_stream.wait_event(self.student_done)
            copy_into_snapshot(snapshot, teacher)
            self.snapshot_ready.record(self.teacher_stream)
        self.student_stream.wait_event(self.snapshot_ready)

    def mark_student_done(self) -> None:
        """Record that all student work issued so far (one replay) is queued before this point."""
        if self.enabled:
            ev = torch.cuda.Event()
            ev.record(self.student_stream)
            self.student_done = ev

    def hand_over(self, tensors: Iterable[Tensor | None]) -> None:
        """Tell the allocator that teacher-stream tensors were used on the student stream."""
        if not self.enabled:
            return
        for t in tensors:
            if t is not None and t.is_cuda:
                t.record_stream(self.student_stream)

    def join(self) -> None:
        """Make the caller's (teacher device's current) stream wait for all student work."""
        if self.enabled:
            torch.cuda.current_stream(self.teacher_device).wait_stream(self.student_stream)
            if self.student_device != self.teacher_device:
                torch.cuda.current_stream(self.student_device).wait_stream(self.student_stream)
