"""``create(name, num_classes, image_size=32, **kw)`` and ``list_models()``.

Every model returns ``(features, logits)``: ``features`` the pooled penultimate vector
``[B, model.feature_dim]``, ``logits`` ``[B, num_classes]``. Multi-exit self-KD models
(``byot_*``) return ``(features_list, logits_list)`` with 4 exits, the deepest LAST. ``image_size``
is the side of the (square) training images; CNNs use it only to check that they can take it,
transformers are built for it. The transformers and ``resnet56`` have ``distill_logits`` (the
distillation head of the last forward, or None: see ``vit.py``) and per-block feature maps
(``block_features.py``).

``drop_path_rate`` (stochastic depth) is taken by the transformers only (default 0; the official ViT
recipes use 0.1). ``official_params(name)`` gives the parameter count of the official model (100
classes, at its official image size) where the paper's code defines one; ``describe_models`` quotes
it.

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
from .cvt import cvt_13
from .mobilenetv2 import MobileNetV2
from .pvt import pvt_tiny
from .resnet56 import resnet56
from .shufflenetv2 import ShuffleNetV2
from .t2t_vit import t2t_vit
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
    drop_path: bool = False  # takes drop_path_rate
    official_params: tuple[int, int] | None = None  # (total, trainable), 100 classes
    official_size: int | None = None  # the official image size


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
    drop_path: bool = False,
    official: tuple[int, int] | int | None = None,
    official_size: int | None = None,
) -> None:
    if isinstance(official, int):
        official = (official, official)
    _REGISTRY[name] = ModelEntry(builder, min_size, multiple, reason, description, drop_path,
                                 official, official_size)  # fmt: skip


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
for _name, _build, _timm_name, _distilled, _label, _official in (
    ("deit_tiny", vit.build_plain_vit, "deit_tiny_patch16_224", False, "DeiT-Tiny", 5_543_716),
    ("deit_tiny_distilled", vit.build_plain_vit, "deit_tiny_distilled_patch16_224", True,
     "DeiT-Tiny with distillation token", 5_563_400),
    ("convit_tiny", vit.build_plain_vit, "convit_tiny", False, "ConViT-Tiny", 5_536_812),
    ("pit_tiny", vit.build_pit, "pit_ti_224", False, "PiT-Ti", 4_615_972),
    ("pit_tiny_distilled", vit.build_pit, "pit_ti_distilled_224", True,
     "PiT-Ti with distillation token, which the official code lacks", None),
):  # fmt: skip
    # The builders check the size themselves: what they take depends on patch_size.
    _register(
        _name,
        partial(_build, _name, _timm_name, distilled=_distilled),
        f"{_label} (timm {_timm_name}); {_VIT_KW}",
        drop_path=True,
        official=_official,
        official_size=224 if _official else None,
    )
_register(
    "pvt_v2_b0",
    partial(vit.build_pvt_v2, "pvt_v2_b0", "pvt_v2_b0"),
    "PVTv2-b0 (timm pvt_v2_b0); kw: drop_path_rate and other timm kwargs",
    min_size=32,
    reason="its first stage's 8x8 spatial-reduction convolution needs 32 px",
    drop_path=True,
    official=3_435_460,
    official_size=224,
)
_register(
    "pvt_tiny",
    pvt_tiny,
    "PVT v1 Tiny (written from the official description; official tensor names); kw: drop_path_rate",
    min_size=32,
    multiple=32,
    reason="its patch embeddings have strides 4, 2, 2, 2; 224 is the official size",
    drop_path=True,
    official=12_767_588,
    official_size=224,
)
for _name, _official in (("t2t_vit_7", (4_078_922, 4_024_394)),
                         ("t2t_vit_14", (21_199_050, 21_119_306))):  # fmt: skip
    _register(
        _name,
        partial(t2t_vit, _name),
        f"T2T-ViT-{_name.rsplit('_', 1)[1]} (written from the official description; frozen "
        "sinusoidal position embedding and Performer projections); kw: drop_path_rate",
        min_size=16,
        multiple=16,
        reason="its soft splits have strides 4, 2, 2; 224 is the official size",
        drop_path=True,
        official=_official,
        official_size=224,
    )
_register(
    "cvt_13",
    cvt_13,
    "CvT-13 (written from the official description; official tensor names); kw: drop_path_rate",
    min_size=16,
    reason="total stride 16; 224 is the official size",
    drop_path=True,
    official=19_650_980,
    official_size=224,
)
_register(
    "resnet56",
    _ignore_size(resnet56),
    "CIFAR ResNet-56 of the official ViT code (16/32/64 channels, 9 blocks per stage), the "
    "intermediate-feature KD teacher",
    min_size=4,
    reason="its two stride-2 stages need at least 4 px; 32 is the official size",
    official=861_620,
    official_size=32,
)


def list_models() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def describe_models() -> dict[str, str]:
    """``{name: one-line description}`` for help texts (with the official parameter count)."""
    out = {}
    for name in list_models():
        entry = _REGISTRY[name]
        text = entry.description
        if entry.official_params is not None:
            total, trainable = entry.official_params
            count = f"{total:,}" + (f" ({trainable:,} trainable)" if trainable != total else "")
            text += f"; official: {count} params (100 classes, {entry.official_size} px)"
        out[name] = text
    return out


def official_params(name: str) -> tuple[int, int] | None:
    """``(total, trainable)`` parameters of the official model ``name`` with 100 classes at its
    official image size (``OFFICIAL_VIT_FACTS.md`` table A), or None where the paper's code has
    none. With ``C`` classes the counts grow by ``(C - 100) * (feature_dim + 1)`` per head."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name].official_params


def create(
    name: str,
    num_classes: int,
    image_size: int = 32,
    *,
    checkpoint: str | os.PathLike | None = None,
    pretrained: bool = False,
    drop_path_rate: float | None = None,
    **kwargs,
) -> nn.Module:
    """Build the model ``name`` for ``num_classes`` classes and square images of side ``image_size``.

    Args:
        name: one of ``list_models()``.
        num_classes: classifier outputs, >= 1.
        image_size: training image side in pixels (32 CIFAR, 64 Tiny-ImageNet, 224 ImageNet/ViT).
        checkpoint: optional path of a local state-dict file to load (strictly).
        pretrained: must be False; this package never downloads weights.
        drop_path_rate: stochastic depth of the transformers (None: the model's default, 0); the
            per-block rates follow each official model. Refused by models without drop path.
        **kwargs: model options (``downsample_factor``, ``width_mult``, ``patch_size``, ...).

    Returns:
        an ``nn.Module`` whose forward maps ``[B, 3, S, S]`` to ``(features, logits)`` and which has
        ``feature_dim`` (and ``num_exits``, ``adapters`` for ``byot_*``; ``distilled`` and
        ``distill_logits`` for the transformers, see ``vit.py``; ``block_taps()`` for the
        transformers and ``resnet56``, see ``block_features.py``).
    """
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
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
    if drop_path_rate is not None:
        if not entry.drop_path:
            raise ValueError(f"{name} has no stochastic depth; drop_path_rate applies to the "
                             "transformers only")  # fmt: skip
        if not isinstance(drop_path_rate, int | float) or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
        kwargs["drop_path_rate"] = float(drop_path_rate)
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
