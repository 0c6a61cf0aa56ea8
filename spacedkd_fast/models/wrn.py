"""Wide residual networks (Zagoruyko & Komodakis), the CIFAR design.

``WRN-d-k``: a 3x3 stem with 16 channels, three groups of ``(d - 4) / 6`` pre-activation basic
blocks with ``16k``, ``32k`` and ``64k`` channels and strides 1, 2, 2, then BN-ReLU, global average
pooling and a linear classifier; ``feature_dim = 64k``. Dropout between the two convolutions of a
block is off by default (``drop_rate``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3(stride)-[dropout]-BN-ReLU-conv3x3 + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.projection = (
            None
            if stride == 1 and cin == cout
            else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        # A projection shortcut reads the pre-activated input, so both paths see the same tensor.
        shortcut = x if self.projection is None else self.projection(pre)
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """Forward: ``[B, 3, H, W]`` -> ``(features [B, 64k], logits [B, num_classes])``."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        groups = []
        cin = 16
        for cout, stride in zip(widths, (1, 2, 2)):
            blocks = [
                WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
            cin = cout
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.feature_dim = cin
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        features = self.pool(F.relu(self.bn(out))).flatten(1)
        return features, self.fc(features)
