"""VGG-11/13/16/19 with BatchNorm (Simonyan & Zisserman; BN variant) adapted to 32x32 inputs.

Adaptation: the three 4096-wide fully connected layers of the ImageNet network are replaced by a
single linear classifier on the 512 globally pooled channels (the usual CIFAR VGG), so
``feature_dim`` is 512. The five 2x2 max-pools need images of at least 32 px. ``features`` has the
layout of torchvision's ``vgg*_bn`` (convolutions with bias, then BN, ReLU), so its state dict loads.
"""

from __future__ import annotations

from torch import Tensor, nn

# Convolution widths per configuration; "M" is a 2x2 max-pool.
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}  # fmt: skip


class VGG(nn.Module):
    """Forward: ``[B, 3, H, W]`` (H, W >= 32) -> ``(features [B, 512], logits [B, num_classes])``."""

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if depth not in CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
        layers: list[nn.Module] = []
        cin = 3
        for item in CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(cin, item, 3, padding=1),
                    nn.BatchNorm2d(item),
                    nn.ReLU(inplace=True),
                ]
                cin = item
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.pool(self.features(x)).flatten(1)
        return features, self.classifier(features)
