"""The pair distiller's hot steps as captured graphs (``cuda_graphs``; :mod:`.graphs`).

Three steps are captured: the teacher's CE step (spaced, offline), the online step (both networks)
and the student's step (a replay, an offline or a ``base`` step). Inside a captured step there is
only device work: the forward under autocast, the loss, the deferred finiteness flag
(:mod:`.deferred_checks`), ``zero_grad`` + backward, the fused optimizer step, which reads the flag
as ``found_inf`` and the current rate from its tensor ``lr``. Around each replay, on the host, in
the order of the eager step: the BN buffer copies of the deferred checks, a replayed batch's
checksum check (before the replay: the graph's optimizer step must see its flag), the check
records and the statistics (clones of the static losses), ``scheduler.step()`` (it writes the
tensor rate in place), counters, the record of the batch. The first calls of each signature run
the eager step (the warm-up), so a graphed run takes exactly the eager run's steps. Random ops
inside a step (dropout, drop-path) draw from CUDA's graph-safe generator offsets: the same
distribution as eager, not the same draws.

Preconditions (:func:`check_graphable`, one line each): the finiteness check deferred
(``check_finite_every > 1``; or off, without a keyed replay to verify), no trace, no grad
scaler, one process, fused optimizers with a tensor ``lr`` on the parameters' device (Adam /
AdamW also ``capturable=True``), modes ``base``, ``online``, ``spaced``, ``offline`` with keyed
or copy replay, no shared optimizer, teacher and student on one device of the backend's type.

Graphs in a run (one per signature seen more than ``warmup`` times, each with its own memory
pool: the step's activations and its own copy of the gradients), times two when the epoch ends
on a smaller batch: ``spaced``: the teacher's step and the student's replay (with overlap: the
replay against the snapshot, and the end-of-run flush against the live teacher, one more per
batch shape); ``offline``: the teacher's step and the student's against the teacher in eval
mode; ``online``: the online step; ``base``: the student's step. The number does not grow with
the run: a signature names what is made once per run (the teacher, the snapshot), never what
each interval makes anew (its loss closure).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .graphs import StepGraphs, make_backend, signature
from .model_io import to_device, train_mode, unwrap
from .options import GRAPHED_MODES
from .trace import batch_checksum


def make_step_graphs(d, cuda_graphs: Any) -> StepGraphs | None:
    """The distiller's :class:`~.graphs.StepGraphs` (``None`` when off), preconditions checked."""
    backend = make_backend(cuda_graphs)
    if backend is None:
        return None
    check_graphable(d, backend)
    d._graph_rates = {}  # keep_optimizers: id(optimizer) -> the rate tensor of each group
    d._graph_state = {}  # id(optimizer) -> (its state dict, the state tensors to keep)
    return StepGraphs(backend)


def check_graphable(d, backend) -> None:
    def refuse(why: str) -> None:
        raise ValueError(f"cuda_graphs {why}")

    verifies = d.replay_buffer.verifies and d.spec.replays is not None
    if d._deferred is None and (d.check_finite or verifies):
        refuse("needs check_finite_every > 1 (a loss or replay checksum read on the host before "
               "every step cannot be captured): pass check_finite_every=N, or cuda_graphs=False")
    if d.trace is not None:
        refuse("cannot write a trace (it reads every step on the host): pass trace=None, or "
               "cuda_graphs=False")
    if d.grad_scaler is not None:
        refuse("cannot use a grad_scaler (it reads its flag on the host every step): use bf16 "
               "autocast without a scaler, or cuda_graphs=False")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and (
            torch.distributed.get_world_size() > 1):
        refuse("supports one process only for now: use cuda_graphs=False")
    if d.mode not in GRAPHED_MODES:
        refuse(f"are not supported for mode {d.mode!r} yet (only {', '.join(GRAPHED_MODES)}): "
               "use cuda_graphs=False")
    if d.replay == "fresh" or d.shared_optimizer:
        refuse("are not supported with replay='fresh' or a shared optimizer yet: use "
               "cuda_graphs=False")
    if d.teacher_device != d.student_device:
        refuse(f"need teacher and student on one device, got {d.teacher_device} and "
               f"{d.student_device}: use cuda_graphs=False")
    if d.student_device.type != backend.device_type:
        refuse(f"need a {backend.device_type.upper()} device (the models are on "
               f"{d.student_device}): use cuda_graphs=False")
    for opt in (d.teacher_opt if d.spec.teacher and not d.spec.frozen_teacher else None,
                d.student_opt):
        if opt is not None:
            check_graph_optimizer(opt)


def check_graph_optimizer(opt: torch.optim.Optimizer) -> None:
    """A captured optimizer step reads the flag as ``found_inf`` (fused kernels) and the rate of
    each replay from a tensor ``lr`` (a float would be frozen into the graph)."""
    for g in opt.param_groups:
        lr, params = g["lr"], g["params"]
        ok = (getattr(opt, "_step_supports_amp_scaling", False) and g.get("fused")
              and isinstance(lr, Tensor) and g.get("capturable", True)
              and all(p.device == lr.device for p in params))
        if not ok:
            raise ValueError(
                f"cuda_graphs needs fused optimizers with a tensor lr on the parameters' device "
                f"(the captured step reads the current rate), got {type(opt).__name__} with "
                f"fused={g.get('fused')}, lr={lr!r}: e.g. torch.optim.SGD(params, "
                "lr=torch.tensor(0.1, device=dev), fused=True) (Adam/AdamW: also "
                "capturable=True), or cuda_graphs=False")


def _rate_on_device(group: dict[str, Any]) -> Any:
    """``group``'s rate as a tensor on its parameters' device (put into the group when it was
    a float or a tensor elsewhere); a group without parameters keeps its rate."""
    lr = group["lr"]
    device = group["params"][0].device if group["params"] else None
    if device is not None and not (isinstance(lr, Tensor) and lr.device == device):
        lr = group["lr"] = torch.as_tensor(lr, device=device)
    return lr


def ready_rates(opt: torch.optim.Optimizer) -> None:
    """Before a capture: a rate that ``load_state_dict`` replaced (a resume puts back the saved
    value: a float, or a tensor on the checkpoint's map location) becomes a tensor on the
    parameters' device again, then the optimizer is checked."""
    for g in opt.param_groups:
        _rate_on_device(g)
    check_graph_optimizer(opt)


def keep_optimizers(d, *opts: torch.optim.Optimizer) -> None:
    """Every graphed step, before anything else: the tensors the graphs read are still the
    optimizers' own. ``load_state_dict`` puts new objects in (each rate and state tensor a deep
    copy or a float): a reload after a capture (a rollback) would leave the graphs stepping
    with a rate nobody writes any more and with the old momentum / moments, on CUDA in memory
    the optimizer no longer holds. The new values go into the kept tensors, which go back in.
    Costs two identity checks per optimizer and one per param group when nothing changed."""
    for opt in opts:
        _keep_rates(d._graph_rates.setdefault(id(opt), []), opt)
        kept = d._graph_state.get(id(opt))
        if kept is not None and kept[0] is not opt.state:
            _put_back_state(kept[1], opt)
            remember_state(d, opt)


def remember_state(d, *opts: torch.optim.Optimizer) -> None:
    """After a warm-up (the optimizer state a later capture reads exists then: warm-ups make it,
    captures do not): the state tensors to keep."""
    for opt in opts:
        d._graph_state[id(opt)] = (opt.state, {
            p: {k: v for k, v in st.items() if isinstance(v, Tensor)}
            for p, st in opt.state.items()})


def _keep_rates(rates: list[Any], opt: torch.optim.Optimizer) -> None:
    for i, g in enumerate(opt.param_groups):
        lr = g["lr"]
        if i >= len(rates):  # a new group (groups are only appended: the projector's)
            rates.append(_rate_on_device(g))
        elif lr is not rates[i] and isinstance(rates[i], Tensor):
            with torch.no_grad():
                if isinstance(lr, Tensor):
                    rates[i].copy_(lr)
                else:
                    rates[i].fill_(lr)
            g["lr"] = rates[i]


def _put_back_state(kept: dict[Tensor, dict[str, Tensor]], opt: torch.optim.Optimizer) -> None:
    with torch.no_grad():
        for p, st in opt.state.items():
            for k, v in st.items():
                old = kept.get(p, {}).get(k)
                if (old is not None and isinstance(v, Tensor) and v is not old
                        and v.shape == old.shape):
                    old.copy_(v)
                    st[k] = old


# -- what a captured step does on the device, and what follows on the host ---------------------
def _update_on_device(d, losses: list[Tensor], updates: list[tuple[Tensor, Any]]) -> None:
    """Flag non-finite losses, then backward and optimizer step of each ``(loss, opt)``."""
    if d._deferred is not None:
        d._deferred.flag_nonfinite(losses)
    for loss, opt in updates:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if d._deferred is not None:
            d._deferred.step_on_device(opt)  # skipped on the device once the flag is set
        else:
            opt.step()


def _after_replay(d, losses: list[tuple[Tensor, str, int]], key: Any, what: str,
                  updates: int) -> None:
    if d._deferred is not None:
        d._deferred.add_loss_checks([loss for loss, _, _ in losses], losses, key, what)
        for _ in range(updates):
            d._deferred.count_update()


def _taken(outputs: Any) -> Any:
    """Copies of a step's static outputs that the next replay does not overwrite."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, outputs)


def _kernel_state(fn: Callable) -> tuple:
    """Host state that decides a loss function's kernels: its code and the modules it closes
    over (the teacher a replay reads: the live one or the overlap snapshot, each made once per
    run, so the key is the same at every interval) in train/eval mode. The key holds the
    modules themselves, not their ``id``: a graph reads their memory, so they must outlive it,
    and a new module can never take a dead one's ``id`` and replay its graph."""
    mods = []
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
        if isinstance(value, nn.Module):
            mods.append((value, unwrap(value).training))
    return fn.__code__, tuple(mods)


# -- the three steps --------------------------------------------------------------------------
def ce_step(d, model: nn.Module, ce_loss: Callable[..., Tensor], key: Any, x: Tensor, y: Tensor,
            opt, scheduler, what: str, record: bool, idle) -> None:
    """The teacher's recorded CE step (:meth:`~.base.EngineBase._recorded_ce_step`)."""
    graphs: StepGraphs = d._graphs
    keep_optimizers(d, opt)
    sig = signature("teacher", (x, y))
    if not graphs.ready(sig):
        ready_rates(opt)
        with graphs.warm_up(sig, "teacher", d.teacher_device):
            d._eager_ce_step(model, ce_loss, key, x, y, opt, scheduler, what, record, idle)
        remember_state(d, opt)
        return
    train_mode(model)  # the mode the graph computes in, also on the host
    checksum = batch_checksum(x, y) if d._need_checksum() else None
    if d._deferred is not None:
        d._deferred.open_unit((model,))

    def body(sx: Tensor, sy: Tensor) -> Tensor:
        loss = ce_loss(sx, sy)
        _update_on_device(d, [loss], [(loss, opt)])
        return loss

    loss = _taken(graphs.replay(sig, d.teacher_device, (x, y), body))
    _after_replay(d, [(loss, "teacher", d.teacher_steps + 1)], key, what, updates=1)
    if scheduler is not None:
        scheduler.step()
    d.teacher_steps += 1
    d._stats.add("teacher_loss", loss)
    if record:
        d.replay_buffer.record(key, x, y, checksum)


def online_step(d, key: Any, x: Tensor, y: Tensor) -> None:
    """Teacher and student on one batch (:meth:`~.spaced.SpacedDistiller._online_step`)."""
    graphs: StepGraphs = d._graphs
    # on the device before anything: a captured step cannot copy from the host (one device:
    # a precondition)
    x, y = to_device(x, d.teacher_device), to_device(y, d.teacher_device)
    keep_optimizers(d, d.teacher_opt, d.student_opt)
    sig = signature("online", (x, y))
    if not graphs.ready(sig):
        ready_rates(d.teacher_opt)
        ready_rates(d.student_opt)
        with graphs.warm_up(sig, "online", d.teacher_device):
            d._eager_online_step(key, x, y)
        remember_state(d, d.teacher_opt, d.student_opt)
        return
    train_mode(d.teacher)
    train_mode(d.student)
    if d._deferred is not None:
        d._deferred.open_unit((d.teacher, d.student))

    def body(sx: Tensor, sy: Tensor):
        t_loss, s_loss, parts = d._online_losses(sx, sy)
        _update_on_device(d, [t_loss, s_loss], [(t_loss, d.teacher_opt), (s_loss, d.student_opt)])
        return t_loss, s_loss, parts

    t_loss, s_loss, parts = _taken(graphs.replay(sig, d.teacher_device, (x, y), body))
    _after_replay(d, [(t_loss, "teacher", d.teacher_steps + 1),
                      (s_loss, "student", d.student_steps + 1)], key, "", updates=2)
    if d.teacher_scheduler is not None:
        d.teacher_scheduler.step()
    d.teacher_steps += 1
    d._stats.add("teacher_loss", t_loss)
    if d.student_scheduler is not None:
        d.student_scheduler.step()
    d._student_done_one(key, d.teacher_steps - 1, None, s_loss, parts)


def student_step(d, key: Any, x: Tensor, y: Tensor, *, loss_fn, guard, teacher_step,
                 expected=None, what: str = "", stream: int | None = None) -> None:
    """One student update (:meth:`~.base.EngineBase._student_step`)."""
    graphs: StepGraphs = d._graphs
    keep_optimizers(d, d.student_opt)
    sig = signature("student", (x, y), *_kernel_state(loss_fn))
    if not graphs.ready(sig):
        ready_rates(d.student_opt)
        with graphs.warm_up(sig, "student", d.student_device):
            d._eager_student_step(key, x, y, loss_fn=loss_fn, guard=guard,
                                  teacher_step=teacher_step, expected=expected, what=what,
                                  stream=stream)
        remember_state(d, d.student_opt)
        return
    train_mode(d.student)
    checksum = batch_checksum(x, y) if expected is not None else None
    exp = None
    if d._deferred is not None:
        d._deferred.open_unit(guard)
        if checksum is not None:  # depends on (x, y) only: flagged before the graph's step
            exp = d._deferred.flag_checksum(checksum, expected)

    def body(sx: Tensor, sy: Tensor):
        loss, parts = loss_fn(sx, sy)
        _update_on_device(d, [loss], [(loss, d.student_opt)])
        return loss, parts

    loss, parts = _taken(graphs.replay(sig, d.student_device, (x, y), body))
    _after_replay(d, [(loss, "student", d.student_steps + 1)], key, what, updates=1)
    if exp is not None:  # after the loss's check, as the eager step queues them
        d._deferred.add_checksum_check(checksum, exp, key)
    if d.student_scheduler is not None:
        d.student_scheduler.step()
    d._student_done_one(key, teacher_step, None, loss, parts, stream)
