"""T2T-ViT-7 and T2T-ViT-14 (Yuan et al., "Tokens-to-Token ViT") as the paper's official code builds them.

Written from the architecture description (OFFICIAL_VIT_FACTS.md section 3.2); tensor names follow
the official model (``t2t_module.attention.{0,1}``, ``t2t_module.projection``, ``layers.N``,
``attn.qkv_transform``, ``attn.projection``, ...) so that its checkpoints load as they are.

Tokens-to-token module: three soft splits (``Unfold`` with kernels 7/3/3, strides 4/2/2, paddings
2/1/1) with a one-head Performer layer (64 wide, 32 random features) after each of the first two,
then a linear projection to the embedding width D. The backbone prepends a class token, adds a
**fixed sinusoidal** position embedding (a frozen parameter) and runs pre-norm transformer layers
with qkv **without bias**; LayerNorm eps 1e-6, exact GELU.

=============  ===  =====  =====  ===========  ===========================
name           D    depth  heads  MLP ratio    params (100 classes, 224 px)
=============  ===  =====  =====  ===========  ===========================
t2t_vit_7      256  7      4      2            4,078,922 (4,024,394 trainable)
t2t_vit_14     384  14     6      3            21,199,050 (21,119,306 trainable)
=============  ===  =====  =====  ===========  ===========================

The frozen tensors are the position embedding and the two Performer projections ``attn.w``.

Image sizes: multiples of 16 px (the token grid is ``image_size / 16``; 14 x 14 at 224). The
position embedding is built for that grid, so inputs of another size are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from .block_features import Tap

TOKEN_DIM = 64
LN_EPS = 1e-6
SIZE_MULTIPLE = 16
CONFIGS = {  # name: (embed dim, depth, heads, mlp ratio)
    "t2t_vit_7": (256, 7, 4, 2),
    "t2t_vit_14": (384, 14, 6, 3),
}


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class PerformerAttention(nn.Module):
    """One-head linear attention with positive random features (FAVOR+), ``d_in -> 64``.

    ``phi(t) = exp(t W^T - |t|^2 / 2) / sqrt(m)`` with ``W`` ``[m, 64]`` orthogonal rows scaled by
    ``sqrt(m)``, frozen; computed in float32. The output keeps a residual through ``v`` (the input
    width differs from 64): ``v + proj(phi(q) (sum_s phi(k_s) v_s^T) / (phi(q) . sum_s phi(k_s)))``.
    """

    def __init__(self, dim_in: int, dim: int = TOKEN_DIM, kernel_ratio: float = 0.5) -> None:
        super().__init__()
        self.dim = dim
        self.m = int(dim * kernel_ratio)
        self.qkv_transform = nn.Linear(dim_in, 3 * dim)  # output order: k, q, v
        self.projection = nn.Linear(dim, dim)
        w = nn.init.orthogonal_(torch.empty(self.m, dim)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def _features(self, t: Tensor) -> Tensor:
        t = t.float()
        half_sq_norm = (t * t).sum(dim=-1, keepdim=True) / 2
        return torch.exp(t @ self.w.float().t() - half_sq_norm) / math.sqrt(self.m)

    def forward(self, x: Tensor) -> Tensor:
        k, q, v = self.qkv_transform(x).split(self.dim, dim=-1)
        kp, qp = self._features(k), self._features(q)  # [B, T, m], float32
        denom = (qp @ kp.sum(dim=1).unsqueeze(-1)) + 1e-8  # [B, T, 1]
        kptv = v.float().transpose(1, 2) @ kp  # [B, 64, m]
        y = (qp @ kptv.transpose(1, 2)) / denom  # [B, T, 64]
        return v + self.projection(y.to(v.dtype))


class PerformerLayer(nn.Module):
    """``y = attn(LN(x))`` (with its residual through v), then ``y + MLP(LN(y))``; no DropPath."""

    def __init__(self, dim_in: int, dim: int = TOKEN_DIM) -> None:
        super().__init__()
        self.norm1 = _layer_norm(dim_in)
        self.attn = PerformerAttention(dim_in, dim)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.attn(self.norm1(x))
        return y + self.mlp(self.norm2(y))


def _grid_after(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class TokensToToken(nn.Module):
    """Image ``[B, 3, S, S]`` -> tokens ``[B, (S/16)^2, D]`` by three soft splits."""

    SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding)

    def __init__(self, embed_dim: int, token_dim: int = TOKEN_DIM) -> None:
        super().__init__()
        self.soft_split = nn.ModuleList(
            [nn.Unfold(kernel_size=k, stride=s, padding=p) for k, s, p in self.SPLITS]
        )
        self.attention = nn.ModuleList(
            [PerformerLayer(3 * 7 * 7, token_dim), PerformerLayer(token_dim * 3 * 3, token_dim)]
        )
        self.projection = nn.Linear(token_dim * 3 * 3, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        for i, (k, s, p) in enumerate(self.SPLITS):
            x = self.soft_split[i](x).transpose(1, 2)  # [B, positions, channels * k * k]
            h, w = _grid_after(h, k, s, p), _grid_after(w, k, s, p)
            if i < 2:
                x = self.attention[i](x)
                x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return self.projection(x)


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias, heads of 64, projection with bias."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv_transform = nn.Linear(dim, 3 * dim, bias=False)
        self.projection = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv_transform(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.projection(out.transpose(1, 2).reshape(b, n, c))


class TransformerLayer(nn.Module):
    """``x + DP(attn(LN(x)))``, then ``x + DP(MLP(LN(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = _layer_norm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = _layer_norm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sinusoid_table(positions: int, dim: int) -> Tensor:
    """``[1, positions, dim]``: ``sin(p / 10000^(2i/dim))`` at ``2i``, ``cos(...)`` at ``2i+1``."""
    p = torch.arange(positions, dtype=torch.float64).unsqueeze(1)
    exponent = (2 * (torch.arange(dim) // 2)).to(torch.float64) / dim
    angles = p / torch.pow(10000.0, exponent)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angles), torch.cos(angles))
    return table.float().unsqueeze(0)


class T2TViT(nn.Module):
    """T2T-ViT returning ``(features [B, D], logits [B, num_classes])``.

    ``features`` is the final-normed class token. ``distill_logits`` is always None (one head).
    """

    def __init__(self, name: str, num_classes: int = 100, image_size: int = 224,
                 drop_path_rate: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        check_image_size(name, image_size)
        dim, depth, heads, mlp_ratio = CONFIGS[name]
        self.image_size = image_size
        self.feature_dim = dim
        self.distill_logits: Tensor | None = None
        self.t2t_module = TokensToToken(dim)
        tokens = (image_size // SIZE_MULTIPLE) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sinusoid_table(tokens + 1, dim), requires_grad=False)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.layers = nn.ModuleList(
            [TransformerLayer(dim, heads, mlp_ratio, rates[i]) for i in range(depth)]
        )
        self.norm = _layer_norm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: every Linear normal(0, 0.02) (not truncated) / bias 0, LayerNorm 1 / 0,
        class token normal(0, 0.02); the sinusoid and the Performer projections stay as built."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def block_taps(self) -> list[Tap]:
        """The transformer layers; the class token is dropped."""
        return [Tap(layer, 1, self.feature_dim) for layer in self.layers]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(
                f"expected images [B, 3, {self.image_size}, {self.image_size}] (the position "
                f"embedding is built for that grid), got {list(x.shape)}; create the model with "
                "another image_size"
            )
        x = self.t2t_module(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        features = self.norm(x)[:, 0]
        return features, self.head(features)


def check_image_size(name: str, image_size: int) -> None:
    if image_size < SIZE_MULTIPLE or image_size % SIZE_MULTIPLE:
        raise ValueError(
            f"{name} cannot take image_size={image_size}: it takes multiples of {SIZE_MULTIPLE} px "
            "(its soft splits have strides 4, 2, 2; 224 is the official size)"
        )


def t2t_vit(name: str, num_classes: int, image_size: int = 224,
            drop_path_rate: float = 0.0) -> T2TViT:  # fmt: skip
    """Build ``t2t_vit_7`` or ``t2t_vit_14``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown T2T-ViT {name!r}; one of {sorted(CONFIGS)}")
    return T2TViT(name, num_classes, image_size, drop_path_rate)
