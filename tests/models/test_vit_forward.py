"""Forward semantics of the hand-written official blocks, against float64 references written here
from the descriptions in OFFICIAL_VIT_FACTS.md section 3 (not from the model code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spacedkd_fast.models.cvt import ConvAttention
from spacedkd_fast.models.pvt import SpatialReductionAttention
from spacedkd_fast.models.resnet56 import ResBlock
from spacedkd_fast.models.t2t_vit import PerformerLayer, T2TViT


def lin(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def heads(t, h):  # [B, N, C] -> [B, h, N, C / h]
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def merge(t):  # [B, h, N, d] -> [B, N, h * d]
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def attention(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def test_pvt_spatial_reduction_attention():
    attn = SpatialReductionAttention(dim=8, num_heads=2, sr_ratio=2).double()
    x = torch.randn(2, 16, 8, dtype=torch.float64)  # a 4x4 grid
    grid = x.transpose(1, 2).reshape(2, 8, 4, 4)
    reduced = F.conv2d(grid, attn.sr.weight, attn.sr.bias, stride=2).flatten(2).transpose(1, 2)
    reduced = F.layer_norm(reduced, (8,), attn.norm.weight, attn.norm.bias, eps=1e-6)
    kv = lin(reduced, attn.kv)  # keys are the first C outputs, values the next C
    q, k, v = heads(lin(x, attn.q), 2), heads(kv[..., :8], 2), heads(kv[..., 8:], 2)
    expected = lin(merge(attention(q, k, v, 4**-0.5)), attn.proj)
    torch.testing.assert_close(attn(x, 4, 4), expected)
    assert reduced.shape[1] == 4  # keys and values on the 2x2 grid


def test_t2t_performer_layer():
    layer = PerformerLayer(12, 64).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    u = F.layer_norm(x, (12,), layer.norm1.weight, layer.norm1.bias, eps=1e-6)
    k, q, v = lin(u, layer.attn.qkv_transform).split(64, dim=-1)  # order k, q, v
    w = layer.attn.w.double()  # [32, 64]

    def phi(t):
        return torch.exp(t @ w.t() - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(32)

    kp, qp = phi(k), phi(q)
    denom = (qp * kp.sum(1, keepdim=True)).sum(-1, keepdim=True)  # phi(q_t) . sum_s phi(k_s)
    y = torch.einsum("btm,bsm,bsd->btd", qp, kp, v) / (denom + 1e-8)
    y = v + lin(y, layer.attn.projection)
    hidden = F.layer_norm(y, (64,), layer.norm2.weight, layer.norm2.bias, eps=1e-6)
    expected = y + lin(F.gelu(lin(hidden, layer.mlp.fc1)), layer.mlp.fc2)
    # the official code computes the random features in float32, even for float64 inputs
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)


def test_t2t_soft_split_grids():
    model = T2TViT("t2t_vit_7", num_classes=3, image_size=224).t2t_module
    sizes = []
    for i in range(2):
        model.attention[i].register_forward_hook(lambda m, a, out: sizes.append(out.shape[1]))
    with torch.device("meta"):
        model = model.to("meta")
        tokens = model(torch.empty(1, 3, 224, 224))
    assert sizes == [56 * 56, 28 * 28] and tokens.shape == (1, 196, 256)


def test_cvt_attention_with_class_token():
    attn = ConvAttention(dim=8, num_heads=2, with_cls_token=True).double().eval()
    for proj in (attn.conv_proj_q, attn.conv_proj_k, attn.conv_proj_v):  # non-trivial BN stats
        proj.bn.running_mean.uniform_(-1, 1)
        proj.bn.running_var.uniform_(0.5, 2)
        proj.bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 1 + 16, 8, dtype=torch.float64)  # class token + a 4x4 grid
    cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(2, 8, 4, 4)

    def conv_bn(proj, stride):
        out = F.conv2d(grid, proj.conv.weight, None, stride=stride, padding=1, groups=8)
        bn = proj.bn
        out = F.batch_norm(out, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=1e-5)
        return torch.cat([cls, out.flatten(2).transpose(1, 2)], dim=1)  # the class token skips it

    q = heads(lin(conv_bn(attn.conv_proj_q, 1), attn.proj_q), 2)
    k = heads(lin(conv_bn(attn.conv_proj_k, 2), attn.proj_k), 2)
    v = heads(lin(conv_bn(attn.conv_proj_v, 2), attn.proj_v), 2)
    assert k.shape[2] == 1 + 4  # keys on the 2x2 grid
    expected = lin(merge(attention(q, k, v, 8**-0.5)), attn.proj)  # the full width's scale
    torch.testing.assert_close(attn(x, 4, 4), expected)


def test_resnet56_projection_block():
    block = ResBlock(4, 8, stride=2).double().eval()
    for bn in (block.bn, block.f.a_bn, block.f.b_bn):
        bn.running_mean.uniform_(-1, 1)
        bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, eps=1e-5)

    short = bn(F.conv2d(x, block.proj.weight, stride=2), block.bn)
    f = F.relu(bn(F.conv2d(x, block.f.a.weight, stride=2, padding=1), block.f.a_bn))
    f = bn(F.conv2d(f, block.f.b.weight, padding=1), block.f.b_bn)
    torch.testing.assert_close(block(x), F.relu(short + f))
