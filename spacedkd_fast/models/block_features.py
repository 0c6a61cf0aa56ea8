"""Per-block feature maps for intermediate-feature KD (OFFICIAL_VIT_FACTS.md section 4.5).

Every transformer of this package (DeiT, PiT, PVT, PVTv2, T2T-ViT, CvT, ConViT) and the CIFAR
ResNet-56 lists its taps with ``model.block_taps()``: one ``Tap`` per block (per stage for
ResNet-56), holding the module, how many special tokens lead its output, and its channel count.
Forward hooks on those modules record each output with the special tokens (class, distillation)
removed and the tokens laid back on their grid, ``[B, C, h, w]``. Features are taken where the
official code takes them: block outputs, before the final norm.

>>> feats = block_features(model, images)          # one forward, list of [B, C_i, h_i, w_i]
>>> with BlockFeatures(model) as rec:              # in a training loop: the same forward
...     _, logits = model(images)                  # gives the logits and rec.features
...     maps = rec.features

The grid of a token output is recovered from the token count and the input's aspect ratio (square
images give square grids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class Tap:
    """A block whose output is a feature map: ``module``'s output is tokens ``[B, N, C]`` led by
    ``prefix_tokens`` special tokens, or already a map ``[B, C, h, w]`` (then the prefix is 0)."""

    module: nn.Module
    prefix_tokens: int
    channels: int


def block_taps(model: nn.Module) -> list[Tap]:
    """The taps of ``model`` (which must define ``block_taps()``), unwrapping DDP / compile."""
    for attr in ("module", "_orig_mod"):  # DistributedDataParallel, torch.compile
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and not hasattr(model, "block_taps"):
            model = inner
    taps = getattr(model, "block_taps", None)
    if taps is None:
        raise TypeError(
            f"{type(model).__name__} has no per-block features (block_taps); the transformers and "
            "resnet56 of spacedkd_fast.models have them"
        )
    return list(taps())


def block_feature_dims(model: nn.Module) -> list[int]:
    """Channel count of each block's feature map (the official ``feature_dims``)."""
    return [tap.channels for tap in block_taps(model)]


def _to_map(out: Tensor, prefix: int, aspect: float) -> Tensor:
    if out.dim() == 4:
        return out
    if out.dim() != 3:
        raise ValueError(f"a tapped block returned a tensor of shape {list(out.shape)}")
    tokens = out[:, prefix:]
    b, n, c = tokens.shape
    h = max(1, round(math.sqrt(n * aspect)))
    w = n // h
    if h * w != n:
        raise ValueError(f"cannot lay {n} tokens on a grid of aspect {aspect:.3f} (h/w)")
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # NCHW shape, channels-last strides


class BlockFeatures:
    """Forward hooks that fill ``features`` with every tapped block's ``[B, C, h, w]`` output.

    Args:
        model: a model with ``block_taps()``.
        indices: keep only these block indices (e.g. ``[0, 6, 11]``); None keeps all.

    ``features`` is cleared at the start of each forward of ``model``, so after a forward it holds
    that forward's maps (with their autograd history). Use as a context manager, or call
    ``remove()`` to take the hooks off.
    """

    def __init__(self, model: nn.Module, indices: Sequence[int] | None = None) -> None:
        taps = block_taps(model)
        if indices is None:
            indices = range(len(taps))
        indices = list(indices)
        for i in indices:
            if not -len(taps) <= i < len(taps):
                raise IndexError(f"block index {i} out of range: the model has {len(taps)} taps")
        self.taps = [taps[i] for i in indices]
        self.features: list[Tensor] = []
        self._aspect = 1.0
        self._handles = [model.register_forward_pre_hook(self._start)]
        for slot, tap in enumerate(self.taps):
            self._handles.append(tap.module.register_forward_hook(self._recorder(slot, tap)))

    def _start(self, module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() == 4:
            self._aspect = x.shape[-2] / x.shape[-1]
        self.features = [None] * len(self.taps)  # type: ignore[list-item]

    def _recorder(self, slot: int, tap: Tap):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if slot < len(self.features):
                self.features[slot] = _to_map(out, tap.prefix_tokens, self._aspect)

        return hook

    @property
    def channels(self) -> list[int]:
        return [tap.channels for tap in self.taps]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> BlockFeatures:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def block_features(model: nn.Module, x: Tensor, indices: Sequence[int] | None = None
                   ) -> list[Tensor]:  # fmt: skip
    """Run ``model(x)`` once and return its per-block feature maps ``[B, C_i, h_i, w_i]``."""
    with BlockFeatures(model, indices) as rec:
        model(x)
        return list(rec.features)


__all__ = ["BlockFeatures", "Tap", "block_feature_dims", "block_features", "block_taps"]
