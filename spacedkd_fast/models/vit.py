"""Vision transformers of the paper's ViT experiments, built with timm (never pretrained).

timm 1.0 has DeiT-Tiny (with and without the distillation token), PiT-Ti (both), PVTv2-b0 and
ConViT-Tiny. It has no PVT v1 (PVT-Tiny), no T2T-ViT and no CvT: those are written in this package
(``pvt.py``, ``t2t_vit.py``, ``cvt.py``) from the official architecture descriptions.

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

Official deltas (OFFICIAL_VIT_FACTS.md section 2). The timm models equal the official ones in
tensors and forward; these builders apply what differs:

* DeiT init: class (and distillation) head weight and bias 0, class token trunc_normal(0.02)
  (timm: head trunc_normal(0.02), class token normal(1e-6)).
* PiT drop path: block ``i`` of 12 (global index) gets ``drop_path_rate * i / 12`` (timm spreads
  ``linspace(0, rate, 12)``); PiT's init is timm's (pos embed / class token trunc_normal(0.02),
  LayerNorm 1 / 0, Linear and Conv PyTorch default).
* PVTv2-b0: every LayerNorm has eps 1e-6 (timm leaves 10 of them, the patch-embedding and
  spatial-reduction norms, at 1e-5).

``drop_path_rate`` defaults to 0 (timm's default); the official recipes use 0.1.

Distillation token (``deit_tiny_distilled``, ``pit_tiny_distilled``): ``model.distilled`` is True.
The official DeiT convention: in train mode ``logits`` is the **class head's** ``[B, C]`` (the
cross-entropy goes on it) and the distillation head's ``[B, C]`` of the same forward is left in
``model.distill_logits`` (the KD loss goes on it); in eval mode ``logits`` is the mean of the two
heads (``distill_logits`` still holds the distillation head). Every other model has
``distill_logits = None``, so a training loop can always read
``getattr(model, "distill_logits", None)``: a tensor means "KD on this, CE on logits". ``features``
is the mean of the two normalised tokens (timm's pre-logits).

Per-block features: ``block_taps()`` lists the blocks for ``spacedkd_fast.models.block_features``
(DeiT: 12 blocks less the class/distillation tokens; PiT: 2 + 6 + 4 blocks; PVTv2: 2 x 4 blocks;
ConViT: 12 blocks, the class token removed from blocks 10 and 11).
"""

from __future__ import annotations

from torch import Tensor, nn

from .block_features import Tap


def default_patch_size(image_size: int) -> int:
    """The patch side used at ``image_size`` when none is given: 4 below 64 px, 8 below 128, else 16."""
    if image_size < 64:
        return 4
    if image_size < 128:
        return 8
    return 16


class TimmClassifier(nn.Module):
    """A timm model returning ``(features [B, feature_dim], logits [B, num_classes])``.

    For distilled models ``logits`` is the class head in train mode and the mean of both heads in
    eval mode; ``distill_logits`` holds the distillation head of the last forward (None otherwise).
    """

    def __init__(self, body: nn.Module, image_size: int, fixed_size: bool, distilled: bool) -> None:
        super().__init__()
        self.body = body
        self.image_size = image_size
        self.fixed_size = fixed_size
        self.distilled = distilled
        self.feature_dim = int(body.head.in_features)
        self.distill_logits: Tensor | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
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
        self.distill_logits = dist_logits
        if self.training:
            return features, cls_logits
        return features, (cls_logits + dist_logits) / 2

    def block_taps(self) -> list[Tap]:
        """Per-block feature taps of the wrapped timm model (see ``block_features``)."""
        body = self.body
        kind = type(body).__name__
        if kind == "PoolingVisionTransformer":  # PiT: class (+ distillation) token first
            blocks = [blk for stage in body.transformers for blk in stage.blocks]
            return [Tap(b, body.num_tokens, b.norm1.normalized_shape[0]) for b in blocks]
        if kind == "PyramidVisionTransformerV2":  # no special tokens
            blocks = [blk for stage in body.stages for blk in stage.blocks]
            return [Tap(b, 0, b.norm1.normalized_shape[0]) for b in blocks]
        if kind == "ConVit":  # the class token joins before block local_up_to_layer
            return [Tap(b, 0 if i < body.local_up_to_layer else 1, body.embed_dim)
                    for i, b in enumerate(body.blocks)]  # fmt: skip
        if hasattr(body, "blocks") and hasattr(body, "num_prefix_tokens"):  # DeiT (+ distilled)
            return [Tap(b, body.num_prefix_tokens, body.embed_dim) for b in body.blocks]
        raise TypeError(f"no per-block feature taps for timm {kind}")


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
    drop_path_rate: float = 0.0,
    **kwargs,
) -> TimmClassifier:
    """DeiT / ConViT: non-overlapping patches, ``image_size`` must be divisible by the patch."""
    patch = _patch_for(name, image_size, patch_size)
    if image_size % patch != 0:
        raise ValueError(
            f"{name} cannot take image_size={image_size}: it must be divisible by the patch size "
            f"{patch} (pass patch_size= to choose another)"
        )
    body = _build(timm_name, num_classes, img_size=image_size, patch_size=patch,
                  drop_path_rate=drop_path_rate, **kwargs)  # fmt: skip
    if name.startswith("deit"):
        deit_official_init(body)
    return TimmClassifier(body, image_size, fixed_size=True, distilled=distilled)


def deit_official_init(body: nn.Module) -> None:
    """The official DeiT init where timm's differs: heads zero (weight and bias), class token
    trunc_normal(0.02). Positional embedding, distillation token, Linear layers (trunc_normal(0.02),
    bias 0), LayerNorm (1 / 0) and the patch convolution (PyTorch default) are already as official."""
    from timm.layers import trunc_normal_

    for head in (body.head, getattr(body, "head_dist", None)):
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
    trunc_normal_(body.cls_token, std=0.02)


def build_pit(
    name: str,
    timm_name: str,
    num_classes: int,
    image_size: int,
    distilled: bool,
    patch_size: int | None = None,
    stride: int | None = None,
    drop_path_rate: float = 0.0,
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
    pit_official_drop_path(body, drop_path_rate)
    return TimmClassifier(body, image_size, fixed_size=True, distilled=distilled)


def pit_official_drop_path(body: nn.Module, drop_path_rate: float) -> list[float]:
    """Give block ``i`` (global index over the stages) the official rate ``rate * i / depth``.

    Both residual branches of a block use that rate. Returns the rates."""
    from timm.layers import DropPath

    blocks = [blk for stage in body.transformers for blk in stage.blocks]
    rates = [drop_path_rate * i / len(blocks) for i in range(len(blocks))]
    for blk, rate in zip(blocks, rates):
        blk.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        blk.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
    return rates


def build_pvt_v2(
    name: str, timm_name: str, num_classes: int, image_size: int, drop_path_rate: float = 0.0,
    **kwargs,
) -> TimmClassifier:  # fmt: skip
    """PVTv2: convolutional position information, so any size >= 32 works after construction."""
    if image_size < 32:
        raise ValueError(
            f"{name} cannot take image_size={image_size}: it needs at least 32 px (its first stage "
            "reduces keys with an 8x8 stride-8 convolution on a stride-4 grid)"
        )
    body = _build(timm_name, num_classes, drop_path_rate=drop_path_rate, **kwargs)
    for m in body.modules():  # official: eps 1e-6 everywhere (timm: 1e-5 in 10 of them)
        if isinstance(m, nn.LayerNorm):
            m.eps = 1e-6
    return TimmClassifier(body, image_size, False, False)
