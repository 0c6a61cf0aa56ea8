"""BatchNorm over equal slices of each batch: one device doing what N-way ``DataParallel`` did.

The official CNN runs used ``nn.DataParallel`` on two GPUs, so each BatchNorm layer normalised
64-sample halves of every 128-sample batch with their own statistics. ``DataParallel`` splits the
batch with ``torch.chunk`` semantics (slices of ``ceil(B / N)`` rows, fewer slices for tiny
batches), and only the replica on the first device shares its buffers with the real module, so the
running statistics (and ``num_batches_tracked``) follow the FIRST slice alone; the others' updates
are lost with their replicas. :func:`apply_bn_groups` reproduces exactly that on one device.
Evaluation (``eval()``) is unchanged: it uses the running statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _SlicedBatchNorm:
    """Mixin: training-mode forward over ``groups`` slices; see the module docstring."""

    groups: int

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.groups == 1 or x.shape[0] < 2:
            return super().forward(x)
        slices = torch.chunk(x, self.groups, dim=0)
        # The first slice goes through the ordinary forward: it updates the running statistics and
        # num_batches_tracked exactly as the replica on device 0 would.
        outs = [super().forward(slices[0])]
        for part in slices[1:]:
            outs.append(F.batch_norm(part, None, None, self.weight, self.bias, True, 0.0, self.eps))
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}"


_CLASSES: dict[type, type] = {}


def _sliced_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Sliced{cls.__name__}", (_SlicedBatchNorm, cls), {})
    return _CLASSES[cls]


def apply_bn_groups(model: nn.Module, groups: int) -> nn.Module:
    """Make every BatchNorm of ``model`` compute training statistics over ``groups`` slices of
    the batch (in place; returns ``model``). ``groups=1`` restores the ordinary behaviour.

    Parameters, buffers and ``state_dict`` keys are unchanged, so checkpoints stay compatible.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"bn groups must be a positive int, got {groups!r}")
    for module in model.modules():
        if not isinstance(module, _BatchNorm) or isinstance(module, nn.SyncBatchNorm):
            continue
        base = next(c for c in type(module).__mro__ if c not in _CLASSES.values()
                    and c is not _SlicedBatchNorm)
        if groups == 1:
            module.__class__ = base
            module.__dict__.pop("groups", None)
        else:
            module.__class__ = _sliced_class(base)
            module.groups = groups
    return model
