"""The KD losses of Spaced KD: the fused loss, the official code's objective, feature losses.

SPEC section 2. The fused loss per row, with ``p = softmax(z_s / T)`` and ``q = softmax(z_t / T)``:

    loss = (1 - alpha) * CE(z_s, y) + alpha * kd_scale * KL(q || p)

computed by the fused op (``spacedkd_fast.ops.kd_op``): one op call per forward whose row kernel
reads the logits once and accumulates in float32 (on CUDA a one-block kernel then reduces the rows). :mod:`spacedkd_fast.ops.objective` wraps these
functions in the one objective type that the engine and the trainer use.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kd_op as ops
from .names import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, FEATURE_LOSSES

REDUCTIONS = tuple(ops.REDUCTIONS)  # the names of the op's reduction codes
_REDUCTION_CODES = ops.REDUCTIONS
_KD_LOSS_FORWARD = torch.ops.spacedkd.kd_loss_forward.default


class KDLossParts(NamedTuple):
    """Loss with its detached parts (means over the non-ignored rows, float32)."""

    loss: Tensor
    ce: Tensor
    kl: Tensor


def check_number(name: str, value, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"kd_loss: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"kd_loss: {name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"kd_loss: {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"kd_loss: {name} must be <= {high}, got {value}")
    return value


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    kd_scale: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    return_parts: bool = False,
) -> Tensor | KDLossParts:
    """Fused ``(1 - alpha) * CE + alpha * kd_scale * KL(softmax(t/T) || softmax(s/T))``.

    Args:
        student_logits: ``[B, C]`` float32/bfloat16 (CPU and CUDA), float16 (CUDA), float64 (CPU).
            Non-contiguous tensors are accepted.
        teacher_logits: ``[B, C]``, same dtype and device. It receives no gradient.
        target: ``[B]`` int64 class indices in ``[0, C)`` or ``ignore_index``.
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        kd_scale: factor of the KL term; ``None`` means ``T * T`` (Hinton's convention). The
            paper's official code uses 1.
        ignore_index: rows with this target contribute nothing (neither CE nor KL).
        reduction: ``"mean"`` (over non-ignored rows; 0 when there are none), ``"sum"`` or
            ``"none"`` (``[B]``, 0 on ignored rows).
        return_parts: also return the batch's CE and KL (detached means over non-ignored rows,
            KL without ``alpha`` or ``kd_scale``), read from the same kernel call.

    Returns:
        The loss in the accumulation dtype (float32; float64 for float64 logits), or
        :class:`KDLossParts` ``(loss, ce, kl)`` when ``return_parts``.

    Errors: shapes, dtypes and devices that do not match, ``temperature <= 0``, ``alpha`` outside
    ``[0, 1]`` raise. On CPU a target outside ``[0, C)`` raises an ``IndexError``; on CUDA it makes
    that row's loss NaN (checking it on the host would cost a synchronisation per step), which
    the trainer stops on with the step named. Non-finite logits give a NaN loss.

    On CPU the gradient is computed during the forward and handed to autograd as it is when the
    loss is backpropagated with gradient 1; backpropagating twice through a retained graph
    after modifying ``.grad`` in place in between is refused by autograd's version check.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, tensor in (("student_logits", student_logits), ("teacher_logits", teacher_logits),
                         ("target", target)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"kd_loss: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    alpha = check_number("alpha", alpha, low=0.0, high=1.0)
    kd_scale = temperature * temperature if kd_scale is None else check_number("kd_scale", kd_scale)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"kd_loss: ignore_index must be an int, got {type(ignore_index).__name__}")

    write_grad = (
        torch.is_grad_enabled()
        and student_logits.requires_grad
        and (student_logits.device.type == "cpu" or ops.CUDA_GRAD_IN_FORWARD)
    )
    # The op overload itself (not the wrapper): this is on every training step's path.
    loss, _, _, _, parts = _KD_LOSS_FORWARD(
        student_logits, teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits,
        target, temperature, alpha, kd_scale,
        ignore_index, _REDUCTION_CODES[reduction], write_grad,
    )
    if not return_parts:
        return loss
    ce, kl = parts.unbind()  # mean CE and KL over the counted rows, from the same op call
    return KDLossParts(loss, ce, kl)


def paper_code_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    alpha: float = DEFAULT_ALPHA,
    return_parts: bool = False,
) -> Tensor | KDLossParts:
    """The official online-KD code's objective, for replication only (SPEC section 2).

    The official code passes probabilities, not log-probabilities, to
    ``nn.KLDivLoss(reduction="batchmean")``, so its "KL" term is
    ``(1/B) * sum q * (log q - p)`` with ``p = softmax(s/T)``, ``q = softmax(t/T)``: not a KL
    divergence (its minimiser is one-hot on the teacher's arg-max). Blended as
    ``(1 - alpha) * CE + alpha * term`` with no ``T^2`` factor. Plain torch ops.
    ``return_parts`` also gives the detached CE and the (non-KL) term as ``kl``.
    """
    temperature = check_number("temperature", temperature, low=0.0, low_open=True)
    alpha = check_number("alpha", alpha, low=0.0, high=1.0)
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits.detach() / temperature, dim=1)
    term = F.kl_div(p, q, reduction="batchmean")  # kl_div(input=p, target=q) = sum q (log q - p)
    ce = F.cross_entropy(student_logits, target)
    loss = (1.0 - alpha) * ce + alpha * term
    return KDLossParts(loss, ce.detach(), term.detach()) if return_parts else loss


def feature_loss(student_feat: Tensor, teacher_feat: Tensor, kind: str = "dist") -> Tensor:
    """Feature-matching loss between ``[B, D]`` features (``teacher_feat`` detached by the caller).

    ``dist``: ``torch.dist``, the unsquared L2 norm of the whole difference (the official code);
    ``l1`` / ``l2`` / ``smooth-l1``: the mean elementwise losses of ``torch.nn.functional``.
    """
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            "feature_loss: student and teacher features must have the same shape, got "
            f"{tuple(student_feat.shape)} and {tuple(teacher_feat.shape)}"
        )
    if kind == "dist":
        return torch.dist(student_feat, teacher_feat)
    if kind == "l1":
        return F.l1_loss(student_feat, teacher_feat)
    if kind == "l2":
        return F.mse_loss(student_feat, teacher_feat)
    if kind == "smooth-l1":
        return F.smooth_l1_loss(student_feat, teacher_feat)
    raise ValueError(f"feature_loss: kind must be one of {FEATURE_LOSSES}, got {kind!r}")
