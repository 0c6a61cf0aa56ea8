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
from importlib import import_module

import torch
from torch import nn

from ..model_catalog import CATALOG, VIT_TIMM, ModelInfo
from ..model_catalog import describe_models as describe_models  # re-exported
from . import vit
from .byot import byot_resnet
from .cifar_resnet import cifar_resnet
from .mobilenetv2 import MobileNetV2
from .resnet56 import resnet56
from .shufflenetv2 import ShuffleNetV2
from .vgg import VGG
from .wrn import WideResNet


@dataclass(frozen=True)
class ModelEntry:
    """How to build one registered name (``builder(num_classes, image_size, **kw)``) and what it
    is (its :class:`~spacedkd_fast.model_catalog.ModelInfo`: sizes, description, official
    counts)."""

    builder: Callable[..., nn.Module]
    info: ModelInfo

    def __getattr__(self, name: str):  # min_image_size, description, ... come from the info
        if name == "info":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.info, name)


def _on_first_use(module: str, builder: str) -> Callable[..., nn.Module]:
    # cvt, pvt and t2t_vit import timm (and with it torchvision and torch._dynamo: about 2 s):
    # loaded when such a model is built, not by every run that imports the registry
    def build(*args, **kwargs) -> nn.Module:
        return getattr(import_module(f".{module}", __package__), builder)(*args, **kwargs)
    return build


def _ignore_size(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    # CNNs with global pooling are the same network at every size; only the checks use the size.
    return lambda num_classes, image_size, **kw: build(num_classes=num_classes, **kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
for _d in (18, 34, 50, 101, 152):
    _BUILDERS[f"resnet{_d}"] = _ignore_size(partial(cifar_resnet, _d))
    _BUILDERS[f"byot_resnet{_d}"] = _ignore_size(partial(byot_resnet, _d))
_BUILDERS["mobilenetv2"] = _ignore_size(MobileNetV2)
_BUILDERS["shufflenetv2"] = _ignore_size(ShuffleNetV2)
for _d in (11, 13, 16, 19):
    _BUILDERS[f"vgg{_d}"] = _ignore_size(partial(VGG, _d))
for _d, _k in ((16, 2), (16, 4), (16, 8), (28, 4), (28, 10), (40, 2), (40, 4)):
    _BUILDERS[f"wrn_{_d}_{_k}"] = _ignore_size(partial(WideResNet, _d, _k))
_VIT_BUILDERS = {"deit_tiny": vit.build_plain_vit, "deit_tiny_distilled": vit.build_plain_vit,
                 "convit_tiny": vit.build_plain_vit, "pit_tiny": vit.build_pit,
                 "pit_tiny_distilled": vit.build_pit}
for _name, _timm_name, _, _ in VIT_TIMM:
    _BUILDERS[_name] = partial(_VIT_BUILDERS[_name], _name, _timm_name,
                               distilled=_name.endswith("_distilled"))
_BUILDERS["pvt_v2_b0"] = partial(vit.build_pvt_v2, "pvt_v2_b0", "pvt_v2_b0")
_BUILDERS["pvt_tiny"] = _on_first_use("pvt", "pvt_tiny")
for _name in ("t2t_vit_7", "t2t_vit_14"):
    _BUILDERS[_name] = partial(_on_first_use("t2t_vit", "t2t_vit"), _name)
_BUILDERS["cvt_13"] = _on_first_use("cvt", "cvt_13")
_BUILDERS["resnet56"] = _ignore_size(resnet56)

# every builder has its catalog entry and every entry its builder (one definition of the names)
assert set(_BUILDERS) == set(CATALOG), set(_BUILDERS) ^ set(CATALOG)
_REGISTRY: dict[str, ModelEntry] = {n: ModelEntry(b, CATALOG[n]) for n, b in _BUILDERS.items()}


def list_models() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


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
