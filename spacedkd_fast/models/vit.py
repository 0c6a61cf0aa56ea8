"""Vision transformers of the paper's ViT experiments, built with timm (never pretrained).

timm 1.0 has DeiT-Tiny (with and without the distillation token), PiT-Ti (both), PVTv2-b0 and
ConViT-Tiny. It has no PVT v1 (PVT-Tiny), no T2T-ViT and no CvT, so those names are not offered.

Every model is wrapped so that it returns ``(features, logits)`` like the CNNs of this package:
``features`` is what timm's ``forward_head(..., pre_logits=True)`` gives (the normalised class token
for DeiT/PiT/ConViT, the mean of the last stage for PVTv2), ``logits`` the classifier on it.

Image sizes. The paper resizes images to 224 px and uses the models' ImageNet settings (patch 16).
At smaller sizes we keep the ImageNet depth and width and shrink only the patch, so that the token
grid stays usable instead of collapsing to 2x2:

============  =========================  ===================================================
model         default patch at size S    sizes accepted
============  =========================  ===================================================
DeiT, ConViT  4 (S < 64), 8 (64 <= S <    S divisible by the patch (32/4 -> 8x8 tokens,
              128), 16 (S >= 128)         64/8 -> 8x8, 224/16 -> 14x14)
PiT           same patch, stride patch/2  S >= patch (32: patch 4 stride 2 -> 15x15 tokens)
PVTv2-b0      fixed (overlapping stride-4 S >= 32 (its spatial-reduction convolution of
              stem, total stride 32)      kernel 8 needs an 8x8 first stage)
============  =========================  ===================================================

``patch_size=`` overrides the default (and ``stride=`` for PiT). DeiT, PiT and ConViT have learned
position embeddings for exactly ``image_size``; feeding another size is an error.

Distillation token (``deit_tiny_distilled``, ``pit_tiny_distilled``): ``model.distilled`` is True.
In train mode ``logits`` is the tuple ``(cls_logits, dist_logits)``: the caller puts the
cross-entropy on the class head and the KD loss on the distillation head, as the official DeiT
code does. In eval mode ``logits`` is their mean, a single ``[B, C]`` tensor. ``features`` is the
mean of the two normalised tokens (timm's pre-logits).
"""

from __future__ import annotations

from torch import Tensor, nn


def default_patch_size(image_size: int) -> int:
    """The patch side used at ``image_size`` when none is given: 4 below 64 px, 8 below 128, else 16."""
    if image_size < 64:
        return 4
    if image_size < 128:
        return 8
    return 16


class TimmClassifier(nn.Module):
    """A timm model returning ``(features [B, feature_dim], logits)``.

    ``logits`` is ``[B, num_classes]``, except for distilled models in train mode where it is the
    tuple ``(cls_logits, dist_logits)`` of two ``[B, num_classes]`` tensors.
    """

    def __init__(self, body: nn.Module, image_size: int, fixed_size: bool, distilled: bool) -> None:
        super().__init__()
        self.body = body
        self.image_size = image_size
        self.fixed_size = fixed_size
        self.distilled = distilled
        self.feature_dim = int(body.head.in_features)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {list(x.shape)}")
        if self.fixed_size and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"this model was built for {self.image_size}x{self.image_size} images (its position "
                f"embeddings have that grid), got {tuple(x.shape[-2:])}; create it with "
                f"image_size={x.shape[-1]} instead"
            )
        tokens = self.body.forward_features(x)
        if not self.distilled:
            features = self.body.forward_head(tokens, pre_logits=True)
            return features, self.body.head(features)
        drop = self.body.head_drop
        cls_token, dist_token = drop(tokens[:, 0]), drop(tokens[:, 1])
        cls_logits = self.body.head(cls_token)
        dist_logits = self.body.head_dist(dist_token)
        features = (cls_token + dist_token) / 2
        if self.training:
            return features, (cls_logits, dist_logits)
        return features, (cls_logits + dist_logits) / 2


def _timm():
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a declared dependency
        raise ImportError("the transformer models need timm: pip install 'timm>=1.0'") from err
    return timm


def _build(timm_name: str, num_classes: int, **kwargs) -> nn.Module:
    if kwargs.pop("pretrained", False):
        raise ValueError("pretrained weights are never downloaded; pass checkpoint= to create()")
    return _timm().create_model(timm_name, pretrained=False, num_classes=num_classes, **kwargs)


def _patch_for(name: str, image_size: int, patch_size: int | None) -> int:
    patch = default_patch_size(image_size) if patch_size is None else patch_size
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"{name}: patch_size must be a positive int, got {patch!r}")
    return patch


def build_plain_vit(
    name: str,
    timm_name: str,
    num_classes: int,
    image_size: int,
    distilled: bool,
    patch_size: int | None = None,
    **kwargs,
) -> TimmClassifier:
    """DeiT / ConViT: non-overlapping patches, ``image_size`` must be divisible by the patch."""
    patch = _patch_for(name, image_size, patch_size)
    if image_size % patch != 0:
        raise ValueError(
            f"{name} cannot take image_size={image_size}: it must be divisible by the patch size "
            f"{patch} (pass patch_size= to choose another)"
        )
    body = _build(timm_name, num_classes, img_size=image_size, patch_size=patch, **kwargs)
    return TimmClassifier(body, image_size, fixed_size=True, distilled=distilled)


def build_pit(
    name: str,
    timm_name: str,
    num_classes: int,
    image_size: int,
    distilled: bool,
    patch_size: int | None = None,
    stride: int | None = None,
    **kwargs,
) -> TimmClassifier:
    """PiT: an overlapping convolutional patch embedding (kernel ``patch``, stride ``patch // 2``)."""
    patch = _patch_for(name, image_size, patch_size)
    stride = max(1, patch // 2) if stride is None else stride
    if image_size < patch:
        raise ValueError(
            f"{name} cannot take image_size={image_size}: smaller than its patch {patch}"
        )
    body = _build(
        timm_name, num_classes, img_size=image_size, patch_size=patch, stride=stride, **kwargs
    )
    return TimmClassifier(body, image_size, fixed_size=True, distilled=distilled)


def build_pvt_v2(
    name: str, timm_name: str, num_classes: int, image_size: int, **kwargs
) -> TimmClassifier:
    """PVTv2: convolutional position information, so any size >= 32 works after construction."""
    if image_size < 32:
        raise ValueError(
            f"{name} cannot take image_size={image_size}: it needs at least 32 px (its first stage "
            "reduces keys with an 8x8 stride-8 convolution on a stride-4 grid)"
        )
    return TimmClassifier(_build(timm_name, num_classes, **kwargs), image_size, False, False)


# Names of the paper's transformer list that timm does not have (reported to the user on request).
NOT_IN_TIMM = {
    "pvt_tiny": "PVT v1 (PVT-Tiny) is not in timm; pvt_v2_b0 is",
    "t2t_vit_7": "T2T-ViT is not in timm",
    "cvt_13": "CvT is not in timm",
}
