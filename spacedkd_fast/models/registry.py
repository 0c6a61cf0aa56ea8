"""``create(name, num_classes, image_size=32, **kw)`` and ``list_models()``.

Every model returns ``(features, logits)``: ``features`` the pooled penultimate vector
``[B, model.feature_dim]``, ``logits`` ``[B, num_classes]``. Multi-exit self-KD models
(``byot_*``) return ``(features_list, logits_list)`` with 4 exits, the deepest LAST. ``image_size``
is the side of the (square) training images; CNNs use it only to check that they can take it,
transformers are built for it.

No weights are ever downloaded: ``pretrained=True`` is refused, and ``checkpoint="path.pt"`` loads a
local file (a state dict, or a dict holding one under ``state_dict``/``model``; ``module.``
prefixes of DataParallel/DDP are removed; a transformer also accepts a plain timm state dict).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from . import vit
from .byot import byot_resnet
from .cifar_resnet import cifar_resnet
from .mobilenetv2 import MobileNetV2
from .shufflenetv2 import ShuffleNetV2
from .vgg import VGG
from .wrn import WideResNet


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered name and which square image sizes it takes."""

    builder: Callable[..., nn.Module]  # builder(num_classes, image_size, **kw)
    min_image_size: int
    size_multiple: int  # image_size must be a multiple of this (1: any size)
    size_reason: str
    description: str


def _ignore_size(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    # CNNs with global pooling are the same network at every size; only the checks use the size.
    return lambda num_classes, image_size, **kw: build(num_classes=num_classes, **kw)


_REGISTRY: dict[str, ModelEntry] = {}


def _register(
    name: str,
    builder: Callable[..., nn.Module],
    description: str,
    *,
    min_size: int = 1,
    multiple: int = 1,
    reason: str = "",
) -> None:
    _REGISTRY[name] = ModelEntry(builder, min_size, multiple, reason, description)


_STRIDE8 = "its three stride-2 stages need at least 8 px"
for _d in (18, 34, 50, 101, 152):
    _register(
        f"resnet{_d}",
        _ignore_size(partial(cifar_resnet, _d)),
        f"CIFAR ResNet-{_d} (3x3 stem, no max-pool); kw: downsample_factor",
        min_size=8,
        reason=_STRIDE8,
    )
    _register(
        f"byot_resnet{_d}",
        _ignore_size(partial(byot_resnet, _d)),
        f"four-exit self-KD ResNet-{_d} (SPEC section 4); kw: downsample_factor",
        min_size=8,
        multiple=8,
        reason="its attention masks (stride 2, then x2 upsampling) need even sizes at layer1..3",
    )
_register(
    "mobilenetv2",
    _ignore_size(MobileNetV2),
    "MobileNetV2 for 32 px inputs (stem and first stride-2 stage at stride 1); kw: width_mult",
    min_size=8,
    reason=_STRIDE8,
)
_register(
    "shufflenetv2",
    _ignore_size(ShuffleNetV2),
    "ShuffleNetV2 for 32 px inputs (3x3 stride-1 stem, no max-pool); kw: net_size",
    min_size=8,
    reason=_STRIDE8,
)
for _d in (11, 13, 16, 19):
    _register(
        f"vgg{_d}",
        _ignore_size(partial(VGG, _d)),
        f"VGG-{_d} with BatchNorm, global pooling + one linear classifier",
        min_size=32,
        reason="its five 2x2 max-pools need at least 32 px",
    )
for _d, _k in ((16, 2), (16, 4), (16, 8), (28, 4), (28, 10), (40, 2), (40, 4)):
    _register(
        f"wrn_{_d}_{_k}",
        _ignore_size(partial(WideResNet, _d, _k)),
        f"WideResNet-{_d}-{_k}; kw: drop_rate",
        min_size=4,
        reason="its two stride-2 groups need at least 4 px",
    )
_VIT_KW = "kw: patch_size, drop_path_rate and other timm kwargs"
for _name, _build, _timm_name, _distilled, _label in (
    ("deit_tiny", vit.build_plain_vit, "deit_tiny_patch16_224", False, "DeiT-Tiny"),
    ("deit_tiny_distilled", vit.build_plain_vit, "deit_tiny_distilled_patch16_224", True,
     "DeiT-Tiny with distillation token"),
    ("convit_tiny", vit.build_plain_vit, "convit_tiny", False, "ConViT-Tiny"),
    ("pit_tiny", vit.build_pit, "pit_ti_224", False, "PiT-Ti"),
    ("pit_tiny_distilled", vit.build_pit, "pit_ti_distilled_224", True,
     "PiT-Ti with distillation token"),
):  # fmt: skip
    # The builders check the size themselves: what they take depends on patch_size.
    _register(
        _name,
        partial(_build, _name, _timm_name, distilled=_distilled),
        f"{_label} (timm {_timm_name}); {_VIT_KW}",
    )
_register(
    "pvt_v2_b0",
    partial(vit.build_pvt_v2, "pvt_v2_b0", "pvt_v2_b0"),
    "PVTv2-b0 (timm pvt_v2_b0); kw: drop_path_rate and other timm kwargs",
    min_size=32,
    reason="its first stage's 8x8 spatial-reduction convolution needs 32 px",
)


def list_models() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def describe_models() -> dict[str, str]:
    """``{name: one-line description}`` for help texts."""
    return {name: _REGISTRY[name].description for name in list_models()}


def create(
    name: str,
    num_classes: int,
    image_size: int = 32,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    **kwargs,
) -> nn.Module:
    """Build the model ``name`` for ``num_classes`` classes and square images of side ``image_size``.

    Args:
        name: one of ``list_models()``.
        num_classes: classifier outputs, >= 1.
        image_size: training image side in pixels (32 CIFAR, 64 Tiny-ImageNet, 224 ImageNet/ViT).
        checkpoint: optional path of a local state-dict file to load (strictly).
        pretrained: must be False; this package never downloads weights.
        **kwargs: model options (``downsample_factor``, ``width_mult``, ``patch_size``, ...).

    Returns:
        an ``nn.Module`` whose forward maps ``[B, 3, S, S]`` to ``(features, logits)`` and which has
        ``feature_dim`` (and ``num_exits``, ``adapters`` for ``byot_*``; ``distilled`` for the
        distillation-token transformers).
    """
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        hint = vit.NOT_IN_TIMM.get(name, "") if isinstance(name, str) else ""
        raise ValueError(
            f"unknown model {name!r}{' (' + hint + ')' if hint else ''}; "
            f"available: {', '.join(list_models())}"
        )
    if pretrained:
        raise ValueError(
            "pretrained=True would download weights, which this package never does; "
            "pass checkpoint='path/to/weights.pt' to load a local file"
        )
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (square images), got {image_size!r}")
    if image_size < entry.min_image_size or image_size % entry.size_multiple != 0:
        need = f"at least {entry.min_image_size} px"
        if entry.size_multiple > 1:
            need += f" and a multiple of {entry.size_multiple}"
        raise ValueError(
            f"{name} cannot take image_size={image_size}: it needs {need} ({entry.size_reason})"
        )
    model = entry.builder(num_classes=num_classes, image_size=image_size, **kwargs)
    model.image_size = image_size
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def _unwrap_state_dict(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the local state-dict file ``path`` into ``model`` strictly (never downloads)."""
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(
            f"checkpoint must be a local file path, not a URL: {path!r} (nothing is downloaded)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True), path)
    target = model
    body = getattr(model, "body", None)
    if isinstance(body, nn.Module) and not any(k.startswith("body.") for k in state):
        target = body  # a plain timm state dict for the wrapped transformer
    result = target.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {path} does not match the model: {len(result.missing_keys)} missing keys "
            f"(first: {result.missing_keys[:3]}), {len(result.unexpected_keys)} unexpected keys "
            f"(first: {result.unexpected_keys[:3]})"
        )
    return model
