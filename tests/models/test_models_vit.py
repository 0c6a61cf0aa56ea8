"""The timm transformers: wrapper outputs equal timm's own forward; distillation-token behaviour."""

from __future__ import annotations

import pytest
import torch

from spacedkd_fast.models import create
from spacedkd_fast.models.vit import default_patch_size


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_default_patch_sizes():
    assert [default_patch_size(s) for s in (32, 48, 64, 96, 128, 224)] == [4, 4, 8, 8, 16, 16]


@pytest.mark.parametrize("name", ["deit_tiny", "pit_tiny", "pvt_v2_b0", "convit_tiny"])
def test_wrapper_logits_are_timms_and_features_its_pre_logits(name):
    model = create(name, 6, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = model(x)
        torch.testing.assert_close(logits, model.body(x), rtol=0, atol=0)
        pre = model.body.forward_head(model.body.forward_features(x), pre_logits=True)
    torch.testing.assert_close(features, pre, rtol=0, atol=0)
    assert features.shape == (2, model.feature_dim)
    assert model.distilled is False
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in model.body.parameters()
    )


@pytest.mark.parametrize("name", ["deit_tiny_distilled", "pit_tiny_distilled"])
def test_distillation_token_heads(name):
    model = create(name, 6, image_size=32)
    assert model.distilled is True
    for head in (model.body.head, model.body.head_dist):  # DeiT's official init zeroes them
        torch.nn.init.normal_(head.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    features, cls_logits = model(x)  # the official convention: the class head in train mode
    dist_logits = model.distill_logits  # ... and the distillation head beside it
    # recompute from the tokens: class head on token 0, distillation head on token 1
    tokens = model.body.forward_features(x)
    torch.testing.assert_close(cls_logits, model.body.head(tokens[:, 0]))
    torch.testing.assert_close(dist_logits, model.body.head_dist(tokens[:, 1]))
    torch.testing.assert_close(features, (tokens[:, 0] + tokens[:, 1]) / 2)
    assert not torch.allclose(cls_logits, dist_logits)  # two different heads
    model.eval()
    with torch.no_grad():
        _, logits = model(x)
        torch.testing.assert_close(logits, (cls_logits + dist_logits) / 2)
        torch.testing.assert_close(logits, model.body(x))  # timm's own evaluation output


def test_distilled_heads_get_their_own_gradients():
    model = create("deit_tiny_distilled", 6, image_size=32).train()
    model(torch.randn(2, 3, 32, 32))
    model.distill_logits.sum().backward()
    assert model.body.head.weight.grad is None
    assert model.body.head_dist.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size, grid", [(32, 15), (64, 15), (224, 27)])
def test_pit_token_grid(size, grid):
    model = create("pit_tiny", 4, image_size=size)
    emb = model.body.patch_embed
    assert (emb.height, emb.width) == (grid, grid)


def test_patch_size_override():
    model = create("deit_tiny", 4, image_size=32, patch_size=8)
    assert model.body.patch_embed.grid_size == (4, 4)
    with pytest.raises(ValueError, match="patch_size must be a positive int"):
        create("deit_tiny", 4, image_size=32, patch_size=0)


def test_pvt_takes_other_sizes_after_construction():
    model = create("pvt_v2_b0", 4, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))[1].shape == (1, 4)
