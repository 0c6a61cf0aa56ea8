"""The self-KD multi-exit ResNet ("Be Your Own Teacher", SPEC section 4).

A CIFAR ResNet trunk with four exits. After ``layer1``, ``layer2`` and ``layer3`` an attention mask
(a depthwise-separable convolution with stride 2, BatchNorm, ReLU, bilinear upsampling x2 and a
sigmoid) multiplies the stage's features; a stack of stride-2 SepConv blocks then doubles the
channels through the widths of the deeper stages (64e -> 128e -> 256e -> 512e) until they reach
``512 * expansion``, global average pooling gives the exit's feature vector and a linear classifier
its logits. Exit 4 is ``layer4`` + pooling + ``fc``, the ordinary ResNet.

The official code pools with ``AvgPool2d(4)``, which equals global pooling at 32x32 inputs; global
pooling keeps the feature size independent of the image size (64 px Tiny-ImageNet). The official
forward returns the exits deepest first; ours returns them deepest LAST (the interface of this
package). ``adapters`` are the adaptation layers ``Linear(512e -> 512e)`` that the self distiller
applies to the shallow exits' features before the feature loss; they are part of the model so that
the optimizer and checkpoints see them.
"""

from __future__ import annotations

from torch import Tensor, nn

from .cifar_resnet import ResNetTrunk, _init_weights


class SepConv(nn.Module):
    """Depthwise-separable block applied twice: (dw kxk stride s, pw 1x1, BN, ReLU), then
    (dw kxk stride 1, pw 1x1 to ``out_channels``, BN, ReLU). Halves the resolution at stride 2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        c = in_channels
        self.op = nn.Sequential(
            nn.Conv2d(c, c, 3, stride=stride, padding=1, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=False),
            nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False),
            nn.Conv2d(c, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class AttentionMask(nn.Module):
    """``sigmoid(upsample2x(relu(bn(SepConv_stride2(x)))))``: a [0, 1] mask of the input's shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mask = nn.Sequential(
            SepConv(channels, channels, stride=2),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=False),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mask(x) * x


def _exit_branch(widths: list[int]) -> nn.Sequential:
    """Stride-2 SepConv blocks through ``widths`` (the channel counts of the deeper stages, ending
    at ``512 * expansion``): at full width each block doubles the channels, as in the official code,
    and a width factor that does not divide evenly still lands on the last stage's width."""
    return nn.Sequential(*(SepConv(cin, cout, stride=2) for cin, cout in zip(widths, widths[1:])))


class MultiExitResNet(ResNetTrunk):
    """Four-exit CIFAR ResNet.

    Forward: ``x [B, 3, H, W]`` -> ``(features_list, logits_list)``, each a list of 4 tensors, exit
    1 (shallowest, after ``layer1``) first and exit 4 (the full network) LAST. Every feature tensor is
    ``[B, feature_dim]`` with ``feature_dim = 512 * expansion`` (times the width factor), every
    logits tensor ``[B, num_classes]``. ``H`` and ``W`` must be multiples of 8 so that the attention
    masks (stride 2 then x2 upsampling) match their stage's resolution.
    """

    num_exits = 4

    def __init__(self, depth: int, num_classes: int, downsample_factor: float = 1.0) -> None:
        super().__init__(depth, downsample_factor)
        e = self.expansion
        stage_out = [w * e for w in self.widths]  # channels leaving layer1..layer4
        self.feature_dim = stage_out[3]
        self.attentions = nn.ModuleList(AttentionMask(c) for c in stage_out[:3])
        self.branches = nn.ModuleList(_exit_branch(stage_out[i:]) for i in range(3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifiers = nn.ModuleList(
            nn.Linear(self.feature_dim, num_classes) for _ in range(self.num_exits)
        )
        self.adapters = nn.ModuleList(
            nn.Linear(self.feature_dim, self.feature_dim) for _ in range(self.num_exits - 1)
        )
        _init_weights(self)  # the exit branches get the trunk's initialisation too

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(
                f"the multi-exit ResNet needs image sides that are multiples of 8, got {tuple(x.shape[-2:])}"
            )
        out = self.stem(x)
        stage_outputs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
            stage_outputs.append(out)
        features = []
        for i in range(self.num_exits - 1):
            attended = self.attentions[i](stage_outputs[i])
            features.append(self.pool(self.branches[i](attended)).flatten(1))
        features.append(self.pool(stage_outputs[3]).flatten(1))
        logits = [head(f) for head, f in zip(self.classifiers, features)]
        return features, logits


def byot_resnet(depth: int, num_classes: int, downsample_factor: float = 1.0) -> MultiExitResNet:
    """Build the four-exit self-KD ResNet-``depth`` (18, 34, 50, 101 or 152)."""
    return MultiExitResNet(depth, num_classes, downsample_factor)
