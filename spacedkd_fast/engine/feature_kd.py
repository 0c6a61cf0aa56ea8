"""The student's feature term: what ``beta * ...`` adds to the KD objective.

Two kinds (``feature_kd=``):

- ``penultimate`` (SPEC section 2): models return ``(features [B, D], logits)``; the student's
  :class:`~.projection.ProjectionHead` maps its features to the teacher's width and
  ``feature_loss`` (``dist``: the unsquared L2 norm of the whole difference) compares them.
- ``inter`` (``OFFICIAL_VIT_FACTS.md`` section 4.5): models return ``(maps, logits)`` with ``maps``
  a list of paired per-block feature maps ``[B, C_k, h_k, w_k]`` (the student's k-th map is
  compared with the teacher's k-th; pick the official index pairs when collecting them, e.g.
  with ``spacedkd_fast.models.block_features.BlockFeatures``). :class:`InterFeatureKD` maps each
  student map with a 1x1 convolution to the teacher's channels, resizes both bilinearly to the
  larger grid and sums the per-pair mean squared errors.

The head is built on the first batch that has features on both sides (its widths come from
there), from a private RNG seeded with ``seed``, and trains with the student.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.losses import feature_loss
from ..ops.names import FEATURE_LOSSES
from .model_io import fp32, seeded_build, to_device
from .options import FEATURE_KD
from .projection import ProjectionHead


class InterFeatureKD(nn.Module):
    """``sum_k MSE(resize(A_k(f_s,k)), resize(f_t,k))`` over paired maps.

    Args:
        student_channels: ``C_s`` of each student map, in pair order.
        teacher_channels: ``C_t`` of each teacher map, in the same order.

    ``A_k`` is ``Conv2d(C_s -> C_t, 1x1, bias)``; both maps of a pair are resized bilinearly
    (``align_corners=False``) to ``(max(h_s, h_t), max(w_s, w_t))``; the MSE averages over all
    ``B * C_t * h * w`` elements.
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels) or not student_channels:
            raise ValueError(f"intermediate-feature KD pairs student and teacher maps one to one; "
                             f"got {len(student_channels)} student and {len(teacher_channels)} "
                             "teacher maps")
        self.adapters = nn.ModuleList(nn.Conv2d(int(cs), int(ct), kernel_size=1, bias=True)
                                      for cs, ct in zip(student_channels, teacher_channels))

    def forward(self, student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
        total = None
        for adapter, fs, ft in zip(self.adapters, student_maps, teacher_maps, strict=True):
            fs = adapter(fs)
            size = (max(fs.shape[-2], ft.shape[-2]), max(fs.shape[-1], ft.shape[-1]))
            if tuple(fs.shape[-2:]) != size:
                fs = F.interpolate(fs, size=size, mode="bilinear", align_corners=False)
            if tuple(ft.shape[-2:]) != size:
                ft = F.interpolate(ft, size=size, mode="bilinear", align_corners=False)
            term = F.mse_loss(fs, ft)
            total = term if total is None else total + term
        return total


def check_feature_kd(kind: str, feature_loss_kind: str | Callable) -> Callable:
    """The feature loss function of ``penultimate`` (``feature_loss_kind``: a name of
    :data:`~spacedkd_fast.ops.losses.FEATURE_LOSSES` or a callable)."""
    if kind not in FEATURE_KD:
        raise ValueError(f"feature_kd must be one of {FEATURE_KD}, got {kind!r}")
    if callable(feature_loss_kind):
        return feature_loss_kind
    if feature_loss_kind not in FEATURE_LOSSES:
        raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES} or a callable, "
                         f"got {feature_loss_kind!r}")
    return functools.partial(feature_loss, kind=feature_loss_kind)


def head_dims(kind: str, s_feat: Any, t_feat: Any) -> tuple:
    """The widths a head needs, from one batch's features."""
    if kind == "inter":
        if not (isinstance(s_feat, list | tuple) and isinstance(t_feat, list | tuple)):
            raise TypeError("feature_kd='inter' needs models that return (list of feature maps "
                            "[B, C, h, w], logits), e.g. through spacedkd_fast.models."
                            "block_features.BlockFeatures; got features of type "
                            f"{type(s_feat).__name__} / {type(t_feat).__name__}")
        return [int(f.shape[1]) for f in s_feat], [int(f.shape[1]) for f in t_feat]
    return int(s_feat.shape[-1]), int(t_feat.shape[-1])


def build_head(kind: str, dims: tuple, seed: int) -> nn.Module:
    """The trained head of ``kind`` for ``dims`` (see :func:`head_dims`), seeded."""
    if kind == "inter":
        return seeded_build(seed, lambda: InterFeatureKD(dims[0], dims[1]))
    return seeded_build(seed, lambda: ProjectionHead(int(dims[0]), int(dims[1])))


def feature_term(kind: str, head: nn.Module, loss_fn: Callable, s_feat: Any, t_feat: Any
                 ) -> Tensor:
    """The feature term (before ``beta``); heads run in fp32 (their inputs may come out of
    autocast in half precision)."""
    if kind == "inter":
        return head([fp32(f) for f in s_feat], [fp32(f) for f in t_feat])
    return loss_fn(head(fp32(s_feat)), fp32(t_feat))


def detached_to(feat: Any, device) -> Any:
    """Teacher features (a tensor or a list of maps) detached and on ``device``."""
    if feat is None:
        return None
    if isinstance(feat, list | tuple):
        return [to_device(f.detach(), device) for f in feat]
    return to_device(feat.detach(), device)
