"""How the engine calls a model: devices, autocast, train mode, output conventions, BatchNorm.

Models are plain modules. Conventions the engine relies on:

- a two-model distiller's model returns logits ``[B, C]`` or ``(features [B, D], logits)``, where
  logits may be a ``(class_head, distillation_head)`` pair (a distilled ViT);
- a self-KD model returns ``(features_list, logits_list)``, deepest exit last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / DataParallel wrapper (the module itself otherwise)."""
    return module.module if isinstance(
        module, nn.parallel.DistributedDataParallel | nn.DataParallel) else module


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` (no call at all when it is there already: this runs every step)."""
    return t if t.device == device else t.to(device, non_blocking=True)


def fp32(t: Tensor) -> Tensor:
    """Half-precision tensors go to fp32 for losses; fp32 / fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """Autocast to ``dtype`` on ``device``; no context at all for ``None``.

    ``cache=False``: without autocast's cache of low-precision weight copies, as torch asks for
    work captured in a CUDA graph (``cuda_graphs``): the cache would hold copies made inside the
    capture (memory of the graph's private pool) and free them at the context's exit while
    capturing. Each weight is cast where it is used instead; the values are the same."""
    if dtype is None:
        return contextlib.nullcontext()
    if not cache:
        return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def norm_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so that device comparisons mean what they say."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def train_mode(model: nn.Module) -> None:
    """Train mode, set only when the model is not in it (a per-step ``train()`` walks every
    module, and would undo a submodule the user keeps in eval mode on purpose)."""
    if not model.training:
        model.train()


def split_output(out: Any) -> tuple[Tensor | None, Any]:
    """``(features, logits)`` from a model output: a tensor of logits or a pair."""
    if isinstance(out, Tensor):
        return None, out
    if isinstance(out, tuple | list) and len(out) == 2:
        return out[0], out[1]
    raise TypeError("a model must return logits [B, C] or a pair (features [B, D], logits [B, C]); "
                    f"got {type(out).__name__}")


def with_distill_head(model: nn.Module, z: Any) -> Any:
    """``(class_head, distillation_head)`` for a model that keeps the distillation head of its last
    train-mode forward in ``model.distill_logits`` (the official DeiT convention; ``None`` or
    absent for other models), else ``z`` unchanged."""
    dist = getattr(unwrap(model), "distill_logits", None)
    return (z, dist) if isinstance(z, Tensor) and isinstance(dist, Tensor) else z


def ce_logits(z: Any) -> Tensor:
    """Logits that CE trains: the class head of a distilled ViT ``(cls, dist)`` pair."""
    return z[0] if isinstance(z, tuple | list) else z


def kd_logits(z: Any) -> Tensor:
    """Logits that the KD term trains: the distillation head of a ``(cls, dist)`` pair."""
    return z[1] if isinstance(z, tuple | list) else z


def target_logits(z: Any) -> Tensor:
    """Soft-target logits of a teacher: the mean of the heads of a ``(cls, dist)`` pair."""
    return (z[0] + z[1]) / 2 if isinstance(z, tuple | list) else z


def tracking_bns(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def frozen_bn_stats(module: nn.Module, bns: list[_BatchNorm] | None = None) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalise with batch statistics in train mode but leave
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` untouched (they briefly stop
    tracking; no buffer is copied or written). ``bns``: the layers, if already collected."""
    changed = tracking_bns(module) if bns is None else bns
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``model`` (unwrapped) in train or eval mode for the block, its own mode restored after."""
    inner = unwrap(model)
    was = inner.training
    if was != training:
        inner.train(training)
    try:
        yield inner
    finally:
        if was != training:
            inner.train(was)


def seeded_build(seed: int, build):
    """``build()`` run with a private RNG seeded with ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class BufferGuard:
    """Preallocated copies of a module's buffers: ``save`` before a forward, ``restore`` if the
    step is refused (forward passes in train mode write BN running statistics)."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = list(module.buffers())
        self.saved = [b.clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)
