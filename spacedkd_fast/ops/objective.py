"""The KD objective: one frozen type used by the library functions, the engine and the trainer.

:class:`KDObjective` names what the student minimises; calling it gives ``(loss, parts)``, which
is the whole protocol the engine relies on (:class:`Objective`): any callable with that signature
can stand in for it, and :func:`as_objective` adapts the other accepted forms (a :class:`KDLoss`
module, or a plain function returning a scalar loss). Defaults are the package's one default
(``DEFAULT_TEMPERATURE``, ``DEFAULT_ALPHA``, ``kd_scale = T*T``), see :mod:`.names`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import (
    REDUCTIONS,
    KDLossParts,
    check_number,
    kd_loss,
    paper_code_kd_loss,
)
from .names import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, KD_KINDS, KD_NORMALIZATIONS

Parts = dict[str, Tensor]


def _at_least_fp32(t: Tensor) -> Tensor:
    """Half-precision heads (autocast) are upcast; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@runtime_checkable
class Objective(Protocol):
    """``objective(student_logits, teacher_logits, target) -> (loss, parts)``.

    ``student_logits`` is ``[B, C]`` or a ``(class_head, distillation_head)`` pair of ``[B, C]``
    tensors (DeiT); ``parts`` maps names (``ce``, ``kl``) to detached scalars for logging.
    """

    def __call__(self, student_logits: Tensor | tuple[Tensor, Tensor], teacher_logits: Tensor,
                 target: Tensor) -> tuple[Tensor, Parts]: ...


@dataclass(frozen=True)
class KDObjective:
    """``(1 - alpha) * CE(z_s, y) + alpha * kd_scale * KL(softmax(z_t/T) || softmax(z_s/T))``.

    Args:
        temperature: ``T > 0``.
        alpha: KD weight in ``[0, 1]``.
        kd_scale: factor of the KL term; ``None`` means ``T * T`` (Hinton's convention). The
            paper's official CNN code uses 1.
        kind: one of :data:`KD_KINDS`. ``paper-code`` ignores ``kd_scale``.
        normalization: one of :data:`KD_NORMALIZATIONS`; ``class`` divides the KL term by ``C``
            (folded into the fused kernel's scale, no extra pass).
        ignore_index: rows with this target contribute nothing.

    With a ``(class_head, distillation_head)`` student output the CE goes to the class head and the
    KD term to the distillation head (DeiT's convention).
    """

    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA
    kd_scale: float | None = None
    kind: str = "kl"
    normalization: str = "batch"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", check_number("temperature", self.temperature,
                                                             low=0.0, low_open=True))
        object.__setattr__(self, "alpha", check_number("alpha", self.alpha, low=0.0, high=1.0))
        if self.kd_scale is not None:
            object.__setattr__(self, "kd_scale", check_number("kd_scale", self.kd_scale, low=0.0))
        if self.kind not in KD_KINDS:
            raise ValueError(f"KDObjective: kind must be one of {KD_KINDS}, got {self.kind!r}")
        if self.normalization not in KD_NORMALIZATIONS:
            raise ValueError(f"KDObjective: normalization must be one of {KD_NORMALIZATIONS}, "
                             f"got {self.normalization!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"KDObjective: ignore_index must be an int, got {self.ignore_index!r}")

    @property
    def scale(self) -> float:
        """The KL factor before any per-class normalisation (``kd_scale`` or ``T*T``)."""
        return self.temperature ** 2 if self.kd_scale is None else float(self.kd_scale)

    def replace(self, **changes) -> KDObjective:
        return replace(self, **changes)

    def kl_scale(self, num_classes: int) -> float:
        """The factor the fused kernel applies to the batch-mean KL for ``C`` classes."""
        return self.scale / num_classes if self.normalization == "class" else self.scale

    def __call__(self, student_logits: Tensor | tuple[Tensor, Tensor], teacher_logits: Tensor,
                 target: Tensor) -> tuple[Tensor, Parts]:
        if isinstance(student_logits, tuple | list):
            return self._two_heads(student_logits[0], student_logits[1], teacher_logits, target)
        if self.kind == "paper-code":
            loss, ce, kl = paper_code_kd_loss(student_logits, teacher_logits, target,
                                              temperature=self.temperature, alpha=self.alpha,
                                              return_parts=True)
        else:
            loss, ce, kl = kd_loss(student_logits, teacher_logits, target,
                                   temperature=self.temperature, alpha=self.alpha,
                                   kd_scale=self.kl_scale(student_logits.shape[-1]),
                                   ignore_index=self.ignore_index, return_parts=True)
        return loss, {"ce": ce, "kl": kl}

    def _two_heads(self, cls_logits: Tensor, dist_logits: Tensor, teacher_logits: Tensor,
                   target: Tensor) -> tuple[Tensor, Parts]:
        if self.kind != "kl":
            raise ValueError("a (class head, distillation head) student output needs kind='kl'")
        # alpha = 1 makes the fused call the pure KD term; the CE of the class head is added here.
        kd, _, kl = kd_loss(_at_least_fp32(dist_logits), _at_least_fp32(teacher_logits), target,
                            temperature=self.temperature, alpha=1.0,
                            kd_scale=self.kl_scale(dist_logits.shape[-1]),
                            ignore_index=self.ignore_index, return_parts=True)
        ce = F.cross_entropy(_at_least_fp32(cls_logits), target, ignore_index=self.ignore_index)
        return (1 - self.alpha) * ce + self.alpha * kd, {"ce": ce.detach(), "kl": kl}


class KDLoss(nn.Module):
    """Module form of :class:`KDObjective`: ``forward(student_logits, teacher_logits, target)``.

    Returns the loss, or :class:`~.losses.KDLossParts` ``(loss, ce, kl)`` with ``return_parts``.
    ``reduction`` other than ``mean`` is available here (not in the engine).
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA,
                 kd_scale: float | None = None, ignore_index: int = -100,
                 reduction: str = "mean", kind: str = "kl", normalization: str = "batch") -> None:
        super().__init__()
        self.objective = KDObjective(temperature, alpha, kd_scale, kind, normalization,
                                     ignore_index)
        if reduction not in REDUCTIONS:
            raise ValueError(f"KDLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if reduction != "mean" and (kind != "kl" or normalization != "batch"):
            raise ValueError("KDLoss: reduction other than 'mean' needs kind='kl' and "
                             "normalization='batch'")
        self.reduction = reduction

    def __getattr__(self, name: str):
        if name in ("temperature", "alpha", "kd_scale", "kind", "normalization", "ignore_index"):
            return getattr(self.objective, name)
        return super().__getattr__(name)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
                return_parts: bool = False) -> Tensor | KDLossParts:
        if self.reduction != "mean":
            o = self.objective
            return kd_loss(student_logits, teacher_logits, target, temperature=o.temperature,
                           alpha=o.alpha, kd_scale=o.kd_scale, ignore_index=o.ignore_index,
                           reduction=self.reduction, return_parts=return_parts)
        loss, parts = self.objective(student_logits, teacher_logits, target)
        return KDLossParts(loss, parts["ce"], parts["kl"]) if return_parts else loss

    def extra_repr(self) -> str:
        o = self.objective
        return (f"temperature={o.temperature}, alpha={o.alpha}, kd_scale={o.kd_scale}, "
                f"kind={o.kind!r}, normalization={o.normalization!r}, "
                f"ignore_index={o.ignore_index}, reduction={self.reduction!r}")


class _ScalarLoss:
    """Adapts a user function ``(student_logits, teacher_logits, target) -> loss`` to
    :class:`Objective` (no parts to log)."""

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, student_logits, teacher_logits, target) -> tuple[Tensor, Parts]:
        return self.fn(student_logits, teacher_logits, target), {}

    def __repr__(self) -> str:
        return f"user loss {getattr(self.fn, '__name__', type(self.fn).__name__)}"


def as_objective(loss: KDObjective | KDLoss | Callable | None) -> Objective:
    """The engine's view of a ``loss=`` argument: ``None`` is the default :class:`KDObjective`;
    a :class:`KDLoss` gives its objective; any other callable returns a scalar loss."""
    if loss is None:
        return KDObjective()
    if isinstance(loss, KDObjective):
        return loss
    if isinstance(loss, KDLoss):
        if loss.reduction != "mean":
            raise ValueError("the engine needs a KDLoss with reduction='mean'")
        return loss.objective
    if isinstance(loss, str):
        raise ValueError(f"loss must be a KDObjective, a KDLoss or a callable, got the string "
                         f"{loss!r}; for the official objective use KDObjective(kind='paper-code', "
                         "temperature=..., alpha=...)")
    if not callable(loss):
        raise TypeError(f"loss must be a KDObjective, a KDLoss or a callable, got "
                        f"{type(loss).__name__}")
    return _ScalarLoss(loss)
