"""MobileNetV2 (Sandler et al.) adapted to 32x32 inputs.

Adaptation: the stem convolution and the first stride-2 stage (24 channels) use stride 1, so the
network downsamples 8x instead of 32x and a 32x32 image leaves the last stage at 4x4 instead of 1x1.
Everything else is the ImageNet network: inverted residual blocks (expand 1x1, depthwise 3x3,
project 1x1 linear), a final 1x1 convolution to 1280 channels, global average pooling and a linear
classifier. ``width_mult`` scales every channel count except the final 1280 (as in the paper, the
final width is only scaled when ``width_mult > 1``).
"""

from __future__ import annotations

from torch import Tensor, nn

# (expansion t, output channels c, repeats n, stride s) of each stage; the ImageNet strides with
# the first two stride-2 positions (stem and the 24-channel stage) set to 1 for 32x32 inputs.
STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu6(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear projection (1x1), residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


def _make_divisible(value: float, divisor: int = 8) -> int:
    # Round channel counts to multiples of 8 without dropping more than 10% (the paper's rule).
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class MobileNetV2(nn.Module):
    """Forward: ``[B, 3, H, W]`` -> ``(features [B, feature_dim], logits [B, num_classes])``;
    ``feature_dim`` is 1280 at ``width_mult <= 1``."""

    def __init__(self, num_classes: int, width_mult: float = 1.0) -> None:
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult!r}")
        cin = _make_divisible(32 * width_mult)
        self.feature_dim = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_relu6(3, cin, 3, stride=1)]
        for t, c, n, s in STAGES:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, self.feature_dim, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.pool(self.features(x)).flatten(1)
        return features, self.classifier(features)
