"""The trainer's test accuracy: :func:`spacedkd_fast.evaluation.evaluate` with the run's autocast
and memory-format settings, summed across processes.

In a multi-process run every rank may evaluate its own share of the test set: pass ``info`` and the
counts are summed across ranks before the division.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..evaluation import evaluate as evaluate_batches
from .distributed import DistInfo, all_reduce_sum
from .speed_defaults import channels_last_on


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
             device: torch.device | str, amp_dtype: torch.dtype | None = None,
             channels_last: bool | str = False, info: DistInfo | None = None) -> dict[str, float]:
    """Top-1/top-5 and loss of ``model`` over ``batches`` (see
    :func:`spacedkd_fast.evaluation.evaluate` for the keys, single- and multi-exit).
    ``channels_last``: a bool, or the configuration's resolved ``on`` / ``off``."""
    sum_across = None
    if info is not None and info.enabled:
        def sum_across(t: Tensor) -> Tensor:
            return all_reduce_sum(t, info)
    return evaluate_batches(model, batches, device=device, amp_dtype=amp_dtype,
                            channels_last=channels_last_on(channels_last), sum_across=sum_across)
