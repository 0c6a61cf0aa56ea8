"""Model zoo of the paper's experiments: every model returns ``(features, logits)``.

>>> from spacedkd_fast.models import create, list_models
>>> model = create("resnet18", num_classes=100, image_size=32)
>>> features, logits = model(images)  # [B, model.feature_dim], [B, 100]

A distilled DeiT returns its class-head logits in train mode and keeps the distillation head's
logits of the same forward in ``model.distill_logits`` (``None`` for every other model); in eval
mode it returns the mean of both heads. ``block_features`` gives per-block maps ``[B, C, h, w]``
(special tokens removed) for intermediate-feature KD; ``apply_bn_groups`` computes BatchNorm
statistics over slices of each batch, as N-way ``DataParallel`` did.
"""

from .block_features import BlockFeatures, block_feature_dims, block_features
from .bn_groups import apply_bn_groups
from .registry import create, describe_models, list_models, load_checkpoint, official_params

__all__ = ["BlockFeatures", "apply_bn_groups", "block_feature_dims", "block_features", "create",
           "describe_models", "list_models", "load_checkpoint", "official_params"]
