"""The plumbing of one engine step: the single host read, the buffer guard of a refused step,
finiteness checks, the optimizer step, trace writes.

Per step, at most one small device-to-host read happens (loss finiteness, replay checksum, trace
values together), and none when ``check_finite=False``, no keyed replay is verified and no trace
is written. With ``check_finite_every = N > 1`` losses and replay checksums are checked on the
device and read once every N updates (:mod:`.deferred_checks`); only a trace still reads per step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .deferred_checks import DeferredChecks
from .errors import NonFiniteLossError, ReplayMismatchError
from .model_io import BufferGuard, to_device


class StepIO:
    """Mixed into :class:`~.base.EngineBase`; reads ``check_finite``, ``trace``,
    ``grad_scaler``, ``replay_buffer`` and ``_guards`` from it."""

    check_finite: bool
    grad_scaler: Any
    trace: Any
    replay_buffer: Any
    _guards: dict[int, BufferGuard]
    _deferred: DeferredChecks | None = None
    _lanes: Any

    # -- host reads -------------------------------------------------------------------------
    def _host_read(self, losses: list[Tensor], checksum: Tensor | None,
                   expected: Tensor | tuple[float, ...] | None, read_checksum: bool = False
                   ) -> tuple[list[float | None], list | None, list | None]:
        """One device-to-host transfer for what this step must decide or log: the losses (when
        ``check_finite``), the batch checksum (when tracing, verifying or ``read_checksum``) and
        the recorded one (``expected``: on the device, or already on the host as a tuple)."""
        want_cs = checksum is not None and (read_checksum or self.trace is not None
                                            or expected is not None)
        if not want_cs and self.check_finite and len(losses) == 1:
            return [losses[0].item()], None, None  # the common case: one scalar, one read
        exp_dev = expected if isinstance(expected, Tensor) else None
        parts: list[Tensor] = []
        if self.check_finite:
            parts += [loss.detach().reshape(1).to(torch.float64) for loss in losses]
        if want_cs:
            parts.append(checksum)
            if exp_dev is not None:
                parts.append(to_device(exp_dev, checksum.device))
        if not parts:
            return [None] * len(losses), None, None
        vals = torch.cat([to_device(p, parts[0].device) for p in parts]).tolist()
        nl = len(losses) if self.check_finite else 0
        lossv = vals[:nl] if nl else [None] * len(losses)
        cs = vals[nl:nl + 4] if want_cs else None
        if exp_dev is not None and want_cs:
            exp = vals[nl + 4:nl + 8]
        else:
            exp = None if expected is None or exp_dev is not None else list(expected)
        return lossv, cs, exp

    def _check_step(self, losses: list[tuple[Tensor, str, int]], key: Any, what: str,
                    checksum: Tensor | None = None, expected: Tensor | tuple | None = None,
                    read_checksum: bool = False) -> list | None:
        """Check a step's ``(loss, role, step)`` values, and a replayed batch's ``checksum``
        against the recorded ``expected`` one: now, in one host read (``check_finite_every=1``),
        or queued on the device (deferred). Returns the checksum on the host when it was read."""
        if self._deferred is None:
            lossv, cs, exp = self._host_read([loss for loss, _, _ in losses], checksum, expected,
                                             read_checksum=read_checksum)
            if expected is not None and cs != exp:
                raise ReplayMismatchError(
                    f"the source gave back a different batch for key {key!r} (checksum {cs}, "
                    f"recorded by the teacher step: {exp}); refusing to train the student on it",
                    key=key, expected=exp, got=cs)
            for v, (_, role, step) in zip(lossv, losses):
                self._check_loss(v, role, step, key, what)
            return cs
        _, cs, _ = self._host_read([], checksum, None)  # a trace still reads the checksum
        self._deferred.check_losses(losses, key, what)
        if expected is not None:
            self._deferred.check_checksum(checksum, expected, key)
        return cs

    def _read_deferred(self, force: bool = False) -> None:
        """Deferred checks: read the device flag when N updates are due (or ``force``) and raise
        the first failure of the window."""
        d = self._deferred
        if d is not None and (force or d.due() or d.failed is not None):
            self._lanes.join()  # student-lane work issued so far is done before the read
            d.read()

    @staticmethod
    def _record_checksum(device_cs: Tensor | None, host_cs: list | None):
        """What a record keeps: the host copy when this step read it anyway (a tuple of four
        floats: no tensor object per record), else the device tensor (no sync was wanted)."""
        return tuple(host_cs) if host_cs is not None else device_cs

    @contextlib.contextmanager
    def _guard(self, *modules: nn.Module | None) -> Iterator[None]:
        """Buffers (BN running statistics) of ``modules`` as they were on entry are put back if
        the block raises: a refused step leaves no trace in the model."""
        if self._deferred is not None:
            self._deferred.open_unit(modules)
            try:
                yield
            except BaseException:
                self._deferred.abort_unit(modules)
                raise
            return
        guards = []
        for m in modules:
            if m is None:
                continue
            guard = self._guards.get(id(m))
            if guard is None:  # built once per module: preallocated copies of its buffers
                guard = self._guards[id(m)] = BufferGuard(m)
            guards.append(guard)
        for g in guards:
            g.save()
        try:
            yield
        except BaseException:
            for g in guards:
                g.restore()
            raise

    def _check_loss(self, value: float | None, role: str, step: int, key: Any, what: str) -> None:
        if value is not None and not math.isfinite(value):
            raise NonFiniteLossError(
                f"non-finite {role} loss ({value}) at {role} step {step} (key {key!r}{what}); "
                "no optimizer step was taken, the weights are those after the last good step",
                step=step, role=role, key=key)

    def _need_checksum(self) -> bool:
        return self.trace is not None or self.replay_buffer.verifies

    def _write(self, event: str, **fields: Any) -> None:
        if self.trace is not None:
            self.trace.write(event, **fields)

    @staticmethod
    def _key_json(key: Any) -> Any:
        return key if isinstance(key, int | str | float) or key is None else repr(key)

    def _backward_step(self, loss: Tensor, opt: torch.optim.Optimizer, scheduler,
                       idle: list[Tensor] | tuple = ()) -> None:
        """Backward and optimizer step. ``idle``: parameters that ``opt`` also holds but ``loss``
        does not reach; they get an exactly-zero gradient (as the official ViT code's
        ``0 * sum(params)`` term gives them), so that AdamW still decays and moves them."""
        opt.zero_grad(set_to_none=True)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self._zero_idle(idle)
            self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            loss.backward()
            self._zero_idle(idle)
            if self._deferred is not None:
                self._deferred.optimizer_step(opt)  # skipped on the device after a failure
            else:
                opt.step()
        if scheduler is not None:
            scheduler.step()

    @staticmethod
    def _zero_idle(params) -> None:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _student_idle(self) -> list[Tensor] | tuple:
        """Parameters the student's optimizer holds besides the student's (a shared optimizer)."""
        return ()
