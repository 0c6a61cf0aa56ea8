"""PVT v1 Tiny (Wang et al., "Pyramid Vision Transformer"), as the paper's official ViT code builds it.

Written from the architecture description (OFFICIAL_VIT_FACTS.md section 3.1); tensor names follow
the official model so that its checkpoints load as they are (``patch_embed1..4``, ``pos_embed1..4``,
``block1..4.J``, ``cls_token``, ``norm``, ``head``).

Four stages of non-overlapping patch embeddings (kernel = stride = 4, 2, 2, 2) and pre-norm blocks
whose attention reduces keys and values with a ``sr x sr`` stride-``sr`` convolution (sr = 8, 4, 2,
1). Learned position embeddings are added after each patch embedding; the last stage prepends a class
token first. Widths 64/128/320/512, two blocks per stage, 1/2/5/8 heads of 64, MLP ratios 8/8/4/4,
LayerNorm eps 1e-6, exact GELU. 12,767,588 parameters with 100 classes at 224 px.

Image sizes: the position embeddings are built for the grid of ``image_size`` (which must be a
multiple of 32 so that every stage has a whole grid); inputs of another size are refused. At 224 px
the grids are 56, 28, 14, 7, as in the official model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn

from .block_features import Tap

PATCH_SIZES = (4, 2, 2, 2)
DIMS = (64, 128, 320, 512)
DEPTHS = (2, 2, 2, 2)
HEADS = (1, 2, 5, 8)
MLP_RATIOS = (8, 8, 4, 4)
SR_RATIOS = (8, 4, 2, 1)
LN_EPS = 1e-6
SIZE_MULTIPLE = 32  # the product of the patch sizes


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from a grid reduced ``sr`` times per side.

    Forward: tokens ``[B, N, C]`` on an ``h x w`` grid (``N = h*w``, plus a leading class token when
    ``sr == 1``) -> ``[B, N, C]``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = _layer_norm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        head_dim = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            grid = x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # a channels-last view, no copy
            x = self.norm(_tokens(self.sr(grid)))
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # scale head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PVTBlock(nn.Module):
    """``x + DP(attn(LN(x)))``, then ``x + DP(MLP(LN(x)))``; one DropPath module for both branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, sr_ratio: int,
                 drop_path: float) -> None:  # fmt: skip
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = SpatialReductionAttention(dim, num_heads, sr_ratio)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution, flattened to tokens, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.norm = _layer_norm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(_tokens(x)), h, w


class PVTTiny(nn.Module):
    """PVT v1 Tiny returning ``(features [B, 512], logits [B, num_classes])``.

    ``features`` is the final-normed class token. ``distill_logits`` is always None (one head).
    """

    def __init__(self, num_classes: int = 100, image_size: int = 224,
                 drop_path_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        check_image_size(image_size)
        self.image_size = image_size
        self.feature_dim = DIMS[-1]
        self.distill_logits: Tensor | None = None
        rates = torch.linspace(0, drop_path_rate, sum(DEPTHS), device="cpu").tolist()
        grid, cin, k = image_size, 3, 0
        for s in range(4):
            grid //= PATCH_SIZES[s]
            tokens = grid * grid + (1 if s == 3 else 0)
            setattr(self, f"patch_embed{s + 1}", PatchEmbed(cin, DIMS[s], PATCH_SIZES[s]))
            setattr(self, f"pos_embed{s + 1}", nn.Parameter(torch.zeros(1, tokens, DIMS[s])))
            blocks = [PVTBlock(DIMS[s], HEADS[s], MLP_RATIOS[s], SR_RATIOS[s], rates[k + j])
                      for j in range(DEPTHS[s])]  # fmt: skip
            setattr(self, f"block{s + 1}", nn.ModuleList(blocks))
            cin, k = DIMS[s], k + DEPTHS[s]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIMS[-1]))
        self.norm = _layer_norm(DIMS[-1])
        self.head = nn.Linear(DIMS[-1], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: Linear trunc_normal(0.02) / bias 0, LayerNorm 1 / 0, position embeddings
        and class token trunc_normal(0.02); convolutions keep PyTorch's default init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for s in range(4):
            trunc_normal_(getattr(self, f"pos_embed{s + 1}"), std=0.02)
        trunc_normal_(self.cls_token, std=0.02)

    def block_taps(self) -> list[Tap]:
        """The 8 blocks (4 stages x 2); the last stage's class token is dropped."""
        return [Tap(block, 1 if s == 3 else 0, DIMS[s])
                for s in range(4) for block in getattr(self, f"block{s + 1}")]  # fmt: skip

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(x, self.image_size)
        b = x.shape[0]
        for s in range(4):
            x, h, w = getattr(self, f"patch_embed{s + 1}")(x)
            if s == 3:
                x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
            x = x + getattr(self, f"pos_embed{s + 1}")
            for block in getattr(self, f"block{s + 1}"):
                x = block(x, h, w)
            if s < 3:
                x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # a channels-last view, no copy
        features = self.norm(x)[:, 0]
        return features, self.head(features)


def _tokens(x: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, h*w, C]``; a view when ``x`` is channels-last (no copy)."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])


def check_image_size(image_size: int) -> None:
    if image_size < SIZE_MULTIPLE or image_size % SIZE_MULTIPLE:
        raise ValueError(
            f"pvt_tiny cannot take image_size={image_size}: it takes multiples of {SIZE_MULTIPLE} "
            "px (its patch embeddings have strides 4, 2, 2, 2; 224 is the official size)"
        )


def _check_input(x: Tensor, image_size: int) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"expected images [B, 3, {image_size}, {image_size}] (the position embeddings are "
            f"built for that grid), got {list(x.shape)}; create the model with another image_size"
        )


def pvt_tiny(num_classes: int, image_size: int = 224, drop_path_rate: float = 0.0) -> PVTTiny:
    """Build PVT v1 Tiny for ``num_classes`` classes and ``image_size`` px square images."""
    return PVTTiny(num_classes, image_size, drop_path_rate)
