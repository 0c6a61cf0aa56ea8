"""Plain-PyTorch compositions of the KD loss, shared by the tests and the benchmarks.

- :func:`kd_loss_float64`: the reference the kernels are tested against (float64 throughout).
- :func:`kd_loss_eager`: the loss as a user writes it with ``torch.nn.functional`` (the baseline
  of the benchmarks, and of ``torch.compile``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kd_loss_float64(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *,
                    temperature: float = 1.0, alpha: float = 0.5, kd_scale: float | None = None,
                    ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """SPEC section 2 in float64, row by row as written there (differentiable w.r.t. student)."""
    s = student_logits.double()
    t = teacher_logits.detach().double()
    kd_scale = temperature * temperature if kd_scale is None else kd_scale
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = torch.logsumexp(s, dim=1) - s.gather(1, safe_target[:, None]).squeeze(1)
    log_p = torch.log_softmax(s / temperature, dim=1)
    log_q = torch.log_softmax(t / temperature, dim=1)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1)
    rows = torch.where(valid, (1.0 - alpha) * ce + alpha * kd_scale * kl, torch.zeros_like(ce))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / valid.sum().clamp(min=1)


def kd_loss_eager(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *,
                  temperature: float = 1.0, alpha: float = 0.5,
                  kd_scale: float | None = None) -> Tensor:
    """The unfused composition: cross_entropy + kl_div(log_softmax, softmax), mean reduction."""
    kd_scale = temperature * temperature if kd_scale is None else kd_scale
    ce = F.cross_entropy(student_logits, target)
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.softmax(teacher_logits.detach() / temperature, dim=1),
        reduction="batchmean",
    )
    return (1.0 - alpha) * ce + alpha * kd_scale * kl
