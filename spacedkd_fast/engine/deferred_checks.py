"""Checks of a training step that do not stop the host: ``check_finite_every = N > 1``.

With ``check_finite_every=1`` (the default) the engine reads every loss on the host before its
optimizer step (one small transfer per step, :mod:`.step_io`). With ``N > 1`` nothing is read
between checkpoints of the window; instead:

- each loss (and each replayed batch's checksum against the recorded one) is checked ON THE
  DEVICE; a failure sets a sticky float32 flag (``found_inf``, 1.0 once anything failed);
- every optimizer step passes that flag as ``optimizer.found_inf``, the attribute through which
  torch's fused SGD / Adam / AdamW kernels skip a step (the GradScaler mechanism): parameters,
  momentum / moment buffers and Adam's ``step`` count stay as they were (the fused Adam path adds
  1 to ``step`` and subtracts the flag back). Non-fused torch optimizers assert that no flag is
  given, so fused optimizers are required;
- BatchNorm buffers written by a forward after the failure are put back at the read from copies
  taken before each guarded block (a pool of copies, reused across windows);
- every N optimizer updates (and at each epoch end, ``pop_stats``, ``state_dict`` and
  ``finish``) the flag is read (one float). If set, the window's checks are read one by one to
  name the FIRST failure (in issue order), the buffers are restored, optimizer state entries that a
  skipped step created (fused SGD allocates an uninitialised momentum buffer on its first step
  even when skipped) are removed, and the error is raised.

Promise (sequential order: CPU, or CUDA without overlap): at the raise, weights, buffers and
optimizer state equal those of a run that stopped just before the first failing block (the
``check_finite_every=1`` result), and the error names the same step, role and key. What moved on:
the engine's counters, the LR schedulers, the logged statistics (host state of a run that has to
stop). With overlap (two CUDA streams) the flag is shared: a step on the failing lane and every
later one on it is skipped; the other lane may take finite steps the sequential order would not
have taken (unverified on a GPU here). No update computed from a non-finite loss ever lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NonFiniteLossError, ReplayMismatchError


@dataclass
class _Check:
    """One device-side check: a loss (``value``) or a replayed batch's checksum (``got`` vs
    ``expected``), inside guarded block ``unit``."""

    unit: int
    kind: str  # "loss" or "checksum"
    role: str
    step: int
    key: Any
    what: str
    value: Tensor | None = None
    got: Tensor | None = None
    expected: Tensor | None = None

    def failed(self) -> bool:
        """Host read of this check (only after the flag said that something failed)."""
        if self.kind == "loss":
            return not bool(torch.isfinite(self.value).all())
        return not torch.equal(self.got.to(self.expected.device), self.expected)

    def error(self) -> RuntimeError:
        if self.kind == "loss":
            v = self.value.item()
            return NonFiniteLossError(
                f"non-finite {self.role} loss ({v}) at {self.role} step {self.step} (key "
                f"{self.key!r}{self.what}); found at a deferred check (check_finite_every): that "
                "update and every later one were skipped on the device, the weights are those "
                "after the last good step", step=self.step, role=self.role, key=self.key)
        got, exp = self.got.tolist(), self.expected.tolist()
        return ReplayMismatchError(
            f"the source gave back a different batch for key {self.key!r} (checksum {got}, "
            f"recorded by the teacher step: {exp}); found at a deferred check: that student "
            "update and every later one were skipped", key=self.key, expected=exp, got=got)


class _BufferCopies:
    """Copies of one module's buffers taken before each guarded block of the window."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = list(module.buffers())
        self.slots: list[list[Tensor]] = []
        self.used: list[int] = []  # unit of each slot in use, in order

    def save(self, unit: int) -> None:
        if not self.buffers:
            return
        i = len(self.used)
        with torch.no_grad():
            if i == len(self.slots):
                self.slots.append([b.clone() for b in self.buffers])
            else:
                torch._foreach_copy_(self.slots[i], self.buffers)
        self.used.append(unit)

    def restore_from(self, unit: int) -> None:
        """Put back the copy taken before the first block at or after ``unit`` (if any)."""
        for i, u in enumerate(self.used):
            if u >= unit:
                with torch.no_grad():
                    torch._foreach_copy_(self.buffers, self.slots[i])
                return

    def drop_last(self) -> None:
        self.used.pop()


class DeferredChecks:
    """The device flag, the window of checks since the last read, buffer copies and the log of
    optimizer state created in the window. Owned by a distiller (``check_finite_every > 1``)."""

    def __init__(self, every: int) -> None:
        self.every = int(every)
        self.flag: Tensor | None = None
        self._one: Tensor | None = None
        self.checks: list[_Check] = []
        self.unit = -1
        self.updates = 0
        self.copies: dict[int, _BufferCopies] = {}
        self.new_state: list[tuple[int, torch.optim.Optimizer, list[Tensor]]] = []
        self.failed: RuntimeError | None = None

    # -- the window -------------------------------------------------------------------------
    def _device_flag(self, device: torch.device) -> Tensor:
        if self.flag is None:
            # 0-dim, as GradScaler's: fused Adam subtracts it from its 0-dim step counts
            self.flag = torch.zeros((), dtype=torch.float32, device=device)
            self._one = torch.ones((), dtype=torch.float32, device=device)
        return self.flag

    def open_unit(self, modules: tuple[nn.Module | None, ...]) -> int:
        """A guarded block starts: copy the buffers of ``modules``."""
        self.unit += 1
        for m in modules:
            if m is None:
                continue
            c = self.copies.get(id(m))
            if c is None:
                c = self.copies[id(m)] = _BufferCopies(m)
            c.save(self.unit)
        return self.unit

    def abort_unit(self, modules: tuple[nn.Module | None, ...]) -> None:
        """The block raised on the host (a user error): its buffers go back now, as without
        deferred checks."""
        for m in modules:
            c = None if m is None else self.copies.get(id(m))
            if c is not None and c.used and c.used[-1] == self.unit:
                c.restore_from(self.unit)
                c.drop_last()

    def check_losses(self, losses: list[tuple[Tensor, str, int]], key: Any, what: str) -> None:
        """Queue a finiteness check of each ``(loss, role, step)``: one kernel sets the flag."""
        vals = self.flag_nonfinite([loss for loss, _, _ in losses])
        self.add_loss_checks(vals, losses, key, what)

    def flag_nonfinite(self, losses: list[Tensor]) -> list[Tensor]:
        """The device half of :meth:`check_losses` (a captured graph runs it): set the flag if a
        loss is non-finite; returns float32 copies of the losses."""
        flag = self._device_flag(losses[0].device)
        vals = [loss.detach().reshape(1).to(flag.device, torch.float32, copy=True)
                for loss in losses]
        # GradScaler's kernel: writes 1.0 into the flag iff a value is non-finite (and
        # multiplies the copies by 1.0); a store-only update, so two streams may share the flag
        torch._amp_foreach_non_finite_check_and_unscale_(vals, flag, self._one)
        return vals

    def add_loss_checks(self, values: list[Tensor], losses: list[tuple[Any, str, int]], key: Any,
                        what: str) -> None:
        """The host half of :meth:`check_losses`: remember ``values`` (one per ``(_, role,
        step)``; tensors that later steps do not overwrite) for the read that names a failure."""
        for v, (_, role, step) in zip(values, losses):
            self.checks.append(_Check(self.unit, "loss", role, step, key, what, value=v))

    def check_checksum(self, got: Tensor, expected: Tensor | tuple, key: Any) -> None:
        """Queue the comparison of a replayed batch's checksum with the recorded one."""
        exp = self.flag_checksum(got, expected)
        self.add_checksum_check(got, exp, key)

    def flag_checksum(self, got: Tensor, expected: Tensor | tuple) -> Tensor:
        """The device half of :meth:`check_checksum`; returns the expected checksum on the
        device."""
        flag = self._device_flag(got.device)
        exp = (expected.to(got.device, non_blocking=True) if isinstance(expected, Tensor)
               else torch.tensor(expected, dtype=got.dtype).to(got.device, non_blocking=True))
        # NaN on a mismatch, through the same store-only kernel as the losses (a masked_fill_
        # would read and write the flag back: a race with the other lane under overlap)
        bad = torch.where((got != exp).any(), float("nan"), 0.0).to(flag.device, torch.float32)
        torch._amp_foreach_non_finite_check_and_unscale_([bad.reshape(1)], flag, self._one)
        return exp

    def add_checksum_check(self, got: Tensor, exp: Tensor, key: Any) -> None:
        self.checks.append(_Check(self.unit, "checksum", "student", 0, key, "", got=got,
                                  expected=exp))

    # -- the optimizer step -----------------------------------------------------------------
    def optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        """``opt.step()`` skipped on the device when the flag is set."""
        n_before = len(opt.state)
        total = sum(len(g["params"]) for g in opt.param_groups)
        keys_before = set(opt.state) if n_before < total else None
        self.step_on_device(opt)
        if keys_before is not None and len(opt.state) != n_before:
            created = [p for p in opt.state if p not in keys_before]
            self.new_state.append((self.unit, opt, created))
        self.count_update()

    def step_on_device(self, opt: torch.optim.Optimizer) -> None:
        """The device half of :meth:`optimizer_step` (a captured graph runs it)."""
        if self.flag is not None:
            opt.found_inf = self.flag
        try:
            opt.step()
        finally:
            if self.flag is not None:
                del opt.found_inf

    def count_update(self) -> None:
        """The host half: one more update in the window."""
        self.updates += 1

    # -- the read ---------------------------------------------------------------------------
    def due(self) -> bool:
        return self.updates >= self.every

    def read(self) -> None:
        """One host read of the flag; on a failure, undo what the skipped blocks wrote and raise
        the error of the first failing check."""
        if self.failed is not None:
            raise self.failed
        if self.flag is None or not self.checks:
            self._reset()
            return
        if self.flag.item() == 0:
            self._reset()
            return
        first = next((c for c in self.checks if c.failed()), self.checks[0])
        for c in self.copies.values():
            c.restore_from(first.unit)
        for unit, opt, created in self.new_state:
            if unit >= first.unit:
                for p in created:
                    opt.state.pop(p, None)
        self.failed = first.error()
        self._reset()
        raise self.failed

    def _reset(self) -> None:
        self.checks = []
        self.new_state = []
        self.updates = 0
        for c in self.copies.values():
            c.used = []


def check_fused(opts: list[torch.optim.Optimizer | None]) -> None:
    """``check_finite_every > 1`` skips a bad step on the device through ``found_inf``, which only
    torch's fused optimizers read: refuse any other (one line naming the fix)."""
    for opt in opts:
        if opt is None:
            continue
        fused = getattr(opt, "_step_supports_amp_scaling", False) and all(
            g.get("fused") for g in opt.param_groups)
        if not fused:
            raise ValueError(
                f"check_finite_every > 1 skips a non-finite step on the device, which needs a "
                f"fused optimizer (e.g. torch.optim.SGD/Adam/AdamW(..., fused=True)); got "
                f"{type(opt).__name__} without fused=True: pass fused=True or "
                "check_finite_every=1")
