"""CIFAR-style ResNets (He et al.) as the paper's online-KD code builds them.

The stem is a single 3x3 convolution with stride 1 and no max-pool, so a 32x32 image keeps its
resolution through ``layer1``; the official code uses this stem for every data set (CIFAR,
Tiny-ImageNet, ImageNet). The four stages have 64/128/256/512 channels (times the block expansion)
with strides 1/2/2/2. Pooling is global average pooling, so any image size of at least 8 px works and
``feature_dim`` does not depend on the image size.

``downsample_factor`` narrows the network the way the official code narrows a teacher: every channel
count is divided by ``sqrt(downsample_factor)`` (``int(64 / sqrt(4)) = 32`` for factor 4).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    # Projection (1x1 conv + BN) only where the shape changes; identity otherwise.
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


BLOCKS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def stage_widths(downsample_factor: float = 1.0) -> tuple[int, ...]:
    """Channel counts of the stem and the four stages after narrowing by ``downsample_factor``."""
    if not (isinstance(downsample_factor, (int, float)) and downsample_factor >= 1.0):
        raise ValueError(f"downsample_factor must be a number >= 1, got {downsample_factor!r}")
    scale = math.sqrt(float(downsample_factor))
    return tuple(int(c / scale) for c in STAGE_CHANNELS)


class ResNetTrunk(nn.Module):
    """Stem and the four stages, exposed separately so the multi-exit ResNet can tap them."""

    def __init__(self, depth: int, downsample_factor: float = 1.0) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS)}, got {depth}")
        block, counts = BLOCKS[depth]
        widths = stage_widths(downsample_factor)
        self.expansion = block.expansion
        self.widths = widths
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for planes, count, stride in zip(widths, counts, STAGE_STRIDES):
            blocks = []
            for i in range(count):
                blocks.append(block(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = in_planes
        _init_weights(self)

    def stem(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class CifarResNet(ResNetTrunk):
    """CIFAR ResNet returning ``(features [B, D], logits [B, num_classes])``.

    ``D = feature_dim = int(512 / sqrt(downsample_factor)) * expansion`` (512 for ResNet-18/34 and
    2048 for ResNet-50/101/152 at full width).
    """

    def __init__(self, depth: int, num_classes: int, downsample_factor: float = 1.0) -> None:
        super().__init__(depth, downsample_factor)
        self.feature_dim = self.out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        features = self.pool(out).flatten(1)
        return features, self.fc(features)


def _init_weights(module: nn.Module) -> None:
    # Kaiming-normal (fan_out) convolutions and unit BatchNorm, torchvision's ResNet convention.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_resnet(depth: int, num_classes: int, downsample_factor: float = 1.0) -> CifarResNet:
    """Build a CIFAR ResNet-``depth`` (18, 34, 50, 101 or 152)."""
    return CifarResNet(depth, num_classes, downsample_factor)
