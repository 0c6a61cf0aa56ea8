"""ShuffleNetV2 (Ma et al.) adapted to 32x32 inputs.

Adaptation: the stem is a 3x3 convolution with stride 1 and no max-pool, so the network
downsamples 8x (one stride-2 unit per stage) instead of 32x. Stage widths follow the paper's
table for the chosen ``net_size`` (0.5, 1.0, 1.5, 2.0); the last 1x1 convolution gives 1024 channels
(2048 at size 2.0), which is ``feature_dim``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# net_size -> (stage output channels, final conv channels), the paper's Table 5.
WIDTHS = {
    0.5: ((48, 96, 192), 1024),
    1.0: ((116, 232, 464), 1024),
    1.5: ((176, 352, 704), 1024),
    2.0: ((244, 488, 976), 2048),
}
REPEATS = (4, 8, 4)
STEM_CHANNELS = 24


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` groups: [B, g*c, H, W] -> [B, c*g, H, W]."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def _branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    # 1x1 -> depthwise 3x3 (stride) -> 1x1, BN after each, ReLU after the 1x1 convolutions.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, stride=stride, padding=1, groups=cout, bias=False),
        nn.BatchNorm2d(cout),
        nn.Conv2d(cout, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ShuffleUnit(nn.Module):
    """Stride 1: split channels in half, transform one half. Stride 2: both halves see the whole
    input (the left one through depthwise 3x3 + 1x1), channels double. Then a channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride == 1:
            if cin != cout:
                raise ValueError("a stride-1 shuffle unit keeps its channel count")
            self.left = nn.Identity()
            self.right = _branch(half, half, 1)
        else:
            self.left = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride=2, padding=1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
            )
            self.right = _branch(cin, half, 2)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
        else:
            left = right = x
        return channel_shuffle(torch.cat((self.left(left), self.right(right)), dim=1), 2)


class ShuffleNetV2(nn.Module):
    """Forward: ``[B, 3, H, W]`` -> ``(features [B, feature_dim], logits [B, num_classes])``."""

    def __init__(self, num_classes: int, net_size: float = 1.0) -> None:
        super().__init__()
        if net_size not in WIDTHS:
            raise ValueError(
                f"ShuffleNetV2 net_size must be one of {sorted(WIDTHS)}, got {net_size!r}"
            )
        stage_widths, self.feature_dim = WIDTHS[net_size]
        self.stem = nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(inplace=True),
        )
        units: list[nn.Module] = []
        cin = STEM_CHANNELS
        for cout, repeats in zip(stage_widths, REPEATS):
            units.append(ShuffleUnit(cin, cout, 2))
            units += [ShuffleUnit(cout, cout, 1) for _ in range(repeats - 1)]
            cin = cout
        self.stages = nn.Sequential(*units)
        self.head = nn.Sequential(
            nn.Conv2d(cin, self.feature_dim, 1, bias=False),
            nn.BatchNorm2d(self.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.pool(self.head(self.stages(self.stem(x)))).flatten(1)
        return features, self.classifier(features)
