"""CIFAR ResNet-56 of the paper's official ViT code: the teacher of every intermediate-feature config.

Written from the architecture description (OFFICIAL_VIT_FACTS.md section 3.4), with the official
tensor names (``stem.conv``, ``s1.b1.f.a``, ``s2.b1.proj``, ``head.fc``, ...) so that its
checkpoints (``work_dirs/r-56_c100/model.pyth``'s ``model_state``) load as they are.

A 3x3 stride-1 stem to 16 channels, then three stages of 9 basic blocks (16, 32, 64 channels,
strides 1, 2, 2; the stride on the first 3x3 convolution; a 1x1 convolution + BN shortcut where
the shape changes), global average pooling and a linear classifier. 861,620 parameters with 100
classes. It is a different network from ``resnet18``..``resnet152`` of ``cifar_resnet.py`` (the
online-KD code's ResNets: other widths, init and tensor names).

Init (official): convolutions normal(0, sqrt(2 / (k*k*C_out))), BatchNorm 1 / 0, Linear
normal(0, 0.01) / bias 0. Per-block features (``block_taps``) are the three stage outputs,
``[B, 16, 32, 32]``, ``[B, 32, 16, 16]``, ``[B, 64, 8, 8]`` at 32 px.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .block_features import Tap

WIDTHS = (16, 32, 64)
MIN_SIZE = 4


class BasicTransform(nn.Module):
    """``a`` (3x3, stride) -> BN -> ReLU -> ``b`` (3x3) -> BN."""

    def __init__(self, w_in: int, w_out: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(w_in, w_out, 3, stride=stride, padding=1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_out)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(w_out, w_out, 3, stride=1, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.b_bn(self.b(self.a_relu(self.a_bn(self.a(x)))))


class ResBlock(nn.Module):
    """``ReLU(shortcut(x) + f(x))``; the shortcut is a 1x1 convolution + BN where the shape changes."""

    def __init__(self, w_in: int, w_out: int, stride: int) -> None:
        super().__init__()
        self.has_proj = w_in != w_out or stride != 1
        if self.has_proj:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out)
        self.f = BasicTransform(w_in, w_out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.bn(self.proj(x)) if self.has_proj else x
        return self.relu(shortcut + self.f(x))


class Stem(nn.Module):
    def __init__(self, w_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, w_out, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(w_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class Stage(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, depth: int) -> None:
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", ResBlock(w_in if i == 0 else w_out, w_out,
                                                  stride if i == 0 else 1))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        for block in self.children():
            x = block(x)
        return x


class Head(nn.Module):
    def __init__(self, w_in: int, num_classes: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w_in, num_classes)


class CifarResNet6n2(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` returning ``(features [B, 64], logits [B, num_classes])``."""

    def __init__(self, depth: int = 56, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}"
            )
        n = (depth - 2) // 6
        self.feature_dim = WIDTHS[-1]
        self.distill_logits: Tensor | None = None
        self.stem = Stem(WIDTHS[0])
        w_in = WIDTHS[0]
        for s, (w_out, stride) in enumerate(zip(WIDTHS, (1, 2, 2))):
            self.add_module(f"s{s + 1}", Stage(w_in, w_out, stride, n))
            w_in = w_out
        self.head = Head(w_in, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: conv normal(0, sqrt(2 / (k*k*C_out))), BN 1 / 0, Linear normal(0, 0.01) / 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def block_taps(self) -> list[Tap]:
        """The three stage outputs (the official teacher features)."""
        return [Tap(self.s1, 0, WIDTHS[0]), Tap(self.s2, 0, WIDTHS[1]), Tap(self.s3, 0, WIDTHS[2])]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.s3(self.s2(self.s1(self.stem(x))))
        features = self.head.avg_pool(x).flatten(1)
        return features, self.head.fc(features)


def resnet56(num_classes: int) -> CifarResNet6n2:
    """Build the official CIFAR ResNet-56 (any image size of at least 4 px; 32 is the official one)."""
    return CifarResNet6n2(56, num_classes)
