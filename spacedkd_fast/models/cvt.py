"""CvT-13 (Wu et al., "CvT: Introducing Convolutions to Vision Transformers") as the official code builds it.

Written from the architecture description (OFFICIAL_VIT_FACTS.md section 3.3); tensor names follow
the official model (``stage{0,1,2}.patch_embed.{proj,norm}``, ``stageK.blocks.N.attn.conv_proj_q.
{conv,bn}``, ``attn.proj_{q,k,v}``, ``stage2.cls_token``, ``norm``, ``head``) so that its
checkpoints load as they are.

Three stages with overlapping convolutional token embeddings (kernels 7/3/3, strides 4/2/2,
paddings 2/1/1, then LayerNorm), widths 64/192/384, depths 1/2/10, 1/3/6 heads of 64, MLP ratio 4.
Attention projects queries, keys and values with a depthwise 3x3 convolution and BatchNorm (stride 1
for queries, 2 for keys and values), then a Linear each; scores are scaled by the **full width**
``C ** -0.5``, not the head width. Only the last stage has a class token, which skips the
convolutions. No position embedding, QuickGELU (``x * sigmoid(1.702 x)``), LayerNorm eps 1e-5.
DropPath only in the last stage (``linspace(0, rate, 10)``). 19,650,980 parameters with 100 classes.

The official forward squeezes the class token, so a batch of one gives logits of shape ``[C]``;
this model always returns ``[B, C]``.

Image sizes: any size of at least 16 px (no parameter depends on it); 224 is the official size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, QuickGELU, trunc_normal_
from torch import Tensor, nn

from .block_features import Tap

DIMS = (64, 192, 384)
DEPTHS = (1, 2, 10)
HEADS = (1, 3, 6)
EMBED = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding)
MLP_RATIO = 4
MIN_SIZE = 16


class DepthwiseBN(nn.Module):
    """Depthwise 3x3 convolution (no bias) + BatchNorm: one of the q / k / v projections."""

    def __init__(self, dim: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return _tokens(self.bn(self.conv(x)))


class ConvAttention(nn.Module):
    """Attention with convolutional projections. Forward: tokens ``[B, (1 +) h*w, C]`` -> same."""

    def __init__(self, dim: int, num_heads: int, with_cls_token: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.with_cls_token = with_cls_token
        self.scale = dim**-0.5
        self.conv_proj_q = DepthwiseBN(dim, stride=1)
        self.conv_proj_k = DepthwiseBN(dim, stride=2)
        self.conv_proj_v = DepthwiseBN(dim, stride=2)
        self.proj_q = nn.Linear(dim, dim)
        self.proj_k = nn.Linear(dim, dim)
        self.proj_v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, t: Tensor) -> Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        if self.with_cls_token:
            cls_token, x = x[:, :1], x[:, 1:]
        grid = x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # a channels-last view, no copy
        q, k, v = self.conv_proj_q(grid), self.conv_proj_k(grid), self.conv_proj_v(grid)
        if self.with_cls_token:
            q, k, v = (torch.cat([cls_token, t], dim=1) for t in (q, k, v))
        q, k, v = (
            self._heads(self.proj_q(q)),
            self._heads(self.proj_k(k)),
            self._heads(self.proj_v(v)),
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CvTBlock(nn.Module):
    """``x + DP(attn(LN(x)))``, then ``x + DP(MLP(LN(x)))``; MLP with QuickGELU."""

    def __init__(self, dim: int, num_heads: int, with_cls_token: bool, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, num_heads, with_cls_token)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * MLP_RATIO, act_layer=QuickGELU)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvEmbed(nn.Module):
    """Overlapping convolution, then LayerNorm over channels: ``[B, C_in, H, W]`` -> tokens
    ``[B, h*w, C]`` and the grid ``(h, w)``."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(_tokens(x)), h, w


class CvTStage(nn.Module):
    """Token embedding, optional class token, blocks. Returns the map and the class token."""

    def __init__(self, in_chans: int, stage: int, with_cls_token: bool, rates: list[float]) -> None:
        super().__init__()
        dim = DIMS[stage]
        self.patch_embed = ConvEmbed(in_chans, dim, *EMBED[stage])
        if with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.with_cls_token = with_cls_token
        self.blocks = nn.ModuleList([CvTBlock(dim, HEADS[stage], with_cls_token, r) for r in rates])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x, h, w = self.patch_embed(x)
        b, _, c = x.shape
        if self.with_cls_token:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x, h, w)
        cls_token = x[:, :1] if self.with_cls_token else None
        if self.with_cls_token:
            x = x[:, 1:]
        return x.reshape(b, h, w, c).permute(0, 3, 1, 2), cls_token  # channels-last view


class CvT13(nn.Module):
    """CvT-13 returning ``(features [B, 384], logits [B, num_classes])``.

    ``features`` is the final-normed class token. ``distill_logits`` is always None (one head).
    """

    def __init__(self, num_classes: int = 100, image_size: int = 224,
                 drop_path_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        check_image_size(image_size)
        self.image_size = image_size
        self.feature_dim = DIMS[-1]
        self.distill_logits: Tensor | None = None
        last = torch.linspace(0, drop_path_rate, DEPTHS[-1], device="cpu").tolist()
        rates = ([0.0] * DEPTHS[0], [0.0] * DEPTHS[1], last)
        cin = 3
        for s in range(3):
            setattr(self, f"stage{s}", CvTStage(cin, s, s == 2, rates[s]))
            cin = DIMS[s]
        self.norm = nn.LayerNorm(DIMS[-1])
        self.head = nn.Linear(DIMS[-1], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: inside the stages Linear trunc_normal(0.02) / bias 0, LayerNorm and
        BatchNorm 1 / 0, class token trunc_normal(0.02); convolutions keep PyTorch's default init;
        head weight trunc_normal(0.02) with PyTorch's default bias U(+-1/sqrt(384)); final norm 1 / 0.
        """
        for s in range(3):
            for m in getattr(self, f"stage{s}").modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm | nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        trunc_normal_(self.stage2.cls_token, std=0.02)
        self.norm.reset_parameters()
        self.head.reset_parameters()  # PyTorch default bias
        trunc_normal_(self.head.weight, std=0.02)

    def block_taps(self) -> list[Tap]:
        """The 13 blocks; the last stage's class token is dropped."""
        return [Tap(block, 1 if s == 2 else 0, DIMS[s])
                for s in range(3) for block in getattr(self, f"stage{s}").blocks]  # fmt: skip

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"expected images [B, 3, H, W] of at least {MIN_SIZE} px, "
                             f"got {list(x.shape)}")  # fmt: skip
        x, _ = self.stage0(x)
        x, _ = self.stage1(x)
        _, cls_token = self.stage2(x)
        features = self.norm(cls_token[:, 0])
        return features, self.head(features)


def _tokens(x: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h*w, C]``; a view when ``x`` is channels-last (no copy)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def check_image_size(image_size: int) -> None:
    if image_size < MIN_SIZE:
        raise ValueError(
            f"cvt_13 cannot take image_size={image_size}: it takes {MIN_SIZE} px or more "
            "(total stride 16; 224 is the official size)"
        )


def cvt_13(num_classes: int, image_size: int = 224, drop_path_rate: float = 0.0) -> CvT13:
    """Build CvT-13 for ``num_classes`` classes."""
    return CvT13(num_classes, image_size, drop_path_rate)
