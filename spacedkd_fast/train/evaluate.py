"""Test accuracy: top-1 and top-5 of a model, or of each exit and the ensemble of a self-KD model.

Counts are accumulated on the device and read once at the end (one host sync per evaluation). In
a multi-process run every rank may evaluate its own share of the test set: pass ``info`` and the
counts are summed across ranks before the division.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..engine.model_io import unwrap
from .distributed import DistInfo, all_reduce_sum
from .speed_defaults import channels_last_on


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of rows whose target is among the ``k`` largest logits, for each k: ``int64 [len(ks)]``.

    ``logits``: ``[B, C]``; ``target``: ``[B]``. ``k`` larger than ``C`` counts every row.
    """
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = top.eq(target.view(-1, 1))  # [B, kmax]
    return torch.stack([hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks])


def _amp_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
             device: torch.device | str, amp_dtype: torch.dtype | None = None,
             channels_last: bool | str = False, info: DistInfo | None = None) -> dict[str, float]:
    """Top-1/top-5 of ``model`` (in eval mode; its mode is restored afterwards), as fractions.

    A model returning ``(features, logits)`` gives ``{"top1", "top5", "loss"}``. A multi-exit model
    returning ``(features_list, logits_list)`` (deepest last) gives ``exit{i}_top1``/``_top5`` for
    each exit and ``ensemble_top1``/``_top5`` for the mean of the exits' logits, plus ``top1``/
    ``top5`` equal to the ensemble's. ``loss`` is the mean cross-entropy (deepest exit).
    ``channels_last``: a bool, or the configuration's resolved ``on`` / ``off``.
    """
    device = torch.device(device)
    channels_last = channels_last_on(channels_last)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    counts: Tensor | None = None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    names: list[str] = []
    try:
        for x, y in batches:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with _amp_context(device, amp_dtype):
                _, logits = net(x)
            if isinstance(logits, (list, tuple)):
                exits = [z.float() for z in logits]
                per = exits + [torch.stack(exits).mean(dim=0)]
                names = [f"exit{i + 1}" for i in range(len(exits))] + ["ensemble"]
            else:
                per = [logits.float()]
                names = [""]
            batch_counts = torch.stack([topk_correct(z, y) for z in per])  # [M, 2]
            counts = batch_counts if counts is None else counts + batch_counts
            deepest = per[-2] if len(per) > 1 else per[0]
            loss_sum += torch.nn.functional.cross_entropy(deepest, y, reduction="sum").double()
            total += y.numel()
    finally:
        net.train(was_training)
    if counts is None:
        raise ValueError("the test set yielded no batches")
    if info is not None and info.enabled:
        counts = all_reduce_sum(counts, info)
        loss_sum = all_reduce_sum(loss_sum, info)
        total = all_reduce_sum(total, info)
    n = int(total.item())
    values = counts.double().div(n).tolist()
    out: dict[str, float] = {"loss": float(loss_sum.item()) / n}
    for name, (top1, top5) in zip(names, values):
        prefix = f"{name}_" if name else ""
        out[f"{prefix}top1"] = top1
        out[f"{prefix}top5"] = top5
    if "ensemble_top1" in out:
        out["top1"], out["top5"] = out["ensemble_top1"], out["ensemble_top5"]
    return out
