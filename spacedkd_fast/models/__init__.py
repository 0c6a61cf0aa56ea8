"""Model zoo of the paper's experiments: every model returns ``(features, logits)``.

>>> from spacedkd_fast.models import create, list_models
>>> model = create("resnet18", num_classes=100, image_size=32)
>>> features, logits = model(images)  # [B, model.feature_dim], [B, 100]
"""

from .registry import create, describe_models, list_models, load_checkpoint

__all__ = ["create", "describe_models", "list_models", "load_checkpoint"]
