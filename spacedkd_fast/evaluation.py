"""``spacedkd_fast.evaluate(model, loader)``: top-1 / top-5 / loss of a model over test batches.

For library users: it needs a model and an iterable of ``(x, y)`` batches (a ``DataLoader``, a
list, a source's ``test()``), nothing of the trainer. The trainer's evaluation
(:mod:`spacedkd_fast.train.evaluate`) is this function plus autocast / channels_last settings and
a sum across processes.

Counts are accumulated on the device and read once at the end (one host sync per evaluation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .engine.model_io import unwrap


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of rows whose target is among the ``k`` largest logits, for each k: ``int64 [len(ks)]``.

    ``logits``: ``[B, C]``; ``target``: ``[B]``. ``k`` larger than ``C`` counts every row.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = top.eq(target.view(-1, 1))  # [B, kmax]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks])


def _logits_of(output: Any) -> Tensor | list[Tensor]:
    """The logits in a model's output: ``logits``, ``(features, logits)`` or, for a multi-exit
    model, ``(features_list, logits_list)`` (deepest exit last)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and len(output) == 2:
        logits = output[1]
        if isinstance(logits, Tensor):
            return logits
        if isinstance(logits, (tuple, list)) and logits and all(isinstance(z, Tensor) for z in logits):
            return list(logits)
    raise TypeError("evaluate: the model must return logits [B, C], (features, logits) or, for a "
                    "multi-exit model, (features_list, logits_list); got "
                    f"{type(output).__name__}")


def _pair_of(item: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a batch: ``(x, y)``, ``[x, y]`` or a keyed ``(key, (x, y))``."""
    if (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], int)
            and isinstance(item[1], (tuple, list))):
        item = item[1]  # a keyed source's (key, batch)
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise TypeError(f"evaluate: each batch must be (images, labels), got {type(item).__name__}")
    return item[0], item[1]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Any], *, device: torch.device | str | None = None,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             sum_across: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) and mean cross-entropy of ``model`` over ``loader``.

    ``model`` is run in eval mode (its mode is restored afterwards). It returns logits, or
    ``(features, logits)`` (the package's models), giving ``{"top1", "top5", "loss", "samples"}``;
    or, multi-exit (self KD), ``(features_list, logits_list)`` with the deepest exit last, which
    adds ``exit{i}_top1`` / ``_top5`` per exit and ``ensemble_top1`` / ``_top5`` for the mean of
    the exits' logits; then ``top1`` / ``top5`` are the ensemble's and ``loss`` the deepest exit's.
    ``loader``: ``(x, y)`` batches (a ``DataLoader``, a list, ...); ``(key, (x, y))`` items of a
    keyed source are accepted too. ``device``: where the batches go (default: the model's).
    ``amp_dtype``: autocast dtype, or ``None`` for full precision. ``sum_across``: sums a tensor
    of counts across processes (the trainer passes an all-reduce).
    """
    net = unwrap(model)
    if device is None:
        p = next(iter(net.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = net.training
    net.eval()
    counts: Tensor | None = None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    names: list[str] = []
    amp = (torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None
           else contextlib.nullcontext())
    try:
        for item in loader:
            x, y = _pair_of(item)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with amp:
                logits = _logits_of(net(x))
            if isinstance(logits, list):
                exits = [z.float() for z in logits]
                per = exits + [torch.stack(exits).mean(dim=0)]
                names = [f"exit{i + 1}" for i in range(len(exits))] + ["ensemble"]
                deepest = exits[-1]
            else:
                per = [logits.float()]
                names = [""]
                deepest = per[0]
            batch_counts = torch.stack([topk_correct(z, y) for z in per])  # [M, 2]
            counts = batch_counts if counts is None else counts + batch_counts
            loss_sum += torch.nn.functional.cross_entropy(deepest, y, reduction="sum").double()
            total += y.numel()
    finally:
        net.train(was_training)
    if counts is None:
        raise ValueError("evaluate: the loader yielded no batches")
    if sum_across is not None:
        counts, loss_sum, total = sum_across(counts), sum_across(loss_sum), sum_across(total)
    n = int(total.item())
    values = counts.double().div(n).tolist()
    out: dict[str, float] = {"loss": float(loss_sum.item()) / n, "samples": n}
    for name, (top1, top5) in zip(names, values):
        prefix = f"{name}_" if name else ""
        out[f"{prefix}top1"] = top1
        out[f"{prefix}top5"] = top5
    if "ensemble_top1" in out:
        out["top1"], out["top5"] = out["ensemble_top1"], out["ensemble_top5"]
    return out
