"""Per-block feature maps (OFFICIAL_VIT_FACTS.md section 4.5): shapes at the official sizes, special
tokens removed, taken before the final norm, one forward, hooks removed afterwards."""

from __future__ import annotations

import pytest
import torch

from spacedkd_fast.models.block_features import (
    BlockFeatures,
    block_feature_dims,
    block_features,
    block_taps,
)
from spacedkd_fast.models.registry import create


def grid(c: int, s: int, n: int = 1) -> list[tuple[int, int, int]]:
    return [(c, s, s)] * n


# (C, h, w) of every block at 224 px (32 px for ResNet-56), from the facts.
EXPECTED = {
    "deit_tiny": grid(192, 14, 12),
    "deit_tiny_distilled": grid(192, 14, 12),
    "convit_tiny": grid(192, 14, 12),
    "pit_tiny": grid(64, 27, 2) + grid(128, 14, 6) + grid(256, 7, 4),
    "pvt_tiny": grid(64, 56, 2) + grid(128, 28, 2) + grid(320, 14, 2) + grid(512, 7, 2),
    "pvt_v2_b0": grid(32, 56, 2) + grid(64, 28, 2) + grid(160, 14, 2) + grid(256, 7, 2),
    "cvt_13": grid(64, 56) + grid(192, 28, 2) + grid(384, 14, 10),
    "t2t_vit_7": grid(256, 14, 7),
    "t2t_vit_14": grid(384, 14, 14),
    "resnet56": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
}
# The official INTER_STUDENT_INDEX of each *_ours config and the maps it selects (facts 4.5 table).
OURS = {
    "deit_tiny": ([0, 6, 11], grid(192, 14, 3)),
    "convit_tiny": ([0, 6, 11], grid(192, 14, 3)),
    "pit_tiny": ([0, 6, 11], [(64, 27, 27), (128, 14, 14), (256, 7, 7)]),
    "pvt_tiny": ([0, 3, 7], [(64, 56, 56), (128, 28, 28), (512, 7, 7)]),
    "pvt_v2_b0": ([0, 3, 7], [(32, 56, 56), (64, 28, 28), (256, 7, 7)]),
    "cvt_13": ([0, 6, 11], [(64, 56, 56), (384, 14, 14), (384, 14, 14)]),
    "t2t_vit_7": ([0, 3, 6], grid(256, 14, 3)),
    "t2t_vit_14": ([0, 7, 13], grid(384, 14, 3)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_block_feature_shapes_at_the_official_size(name):
    # meta tensors: the shapes of the official-size forward without its arithmetic
    s = 32 if name == "resnet56" else 224
    with torch.device("meta"):
        model = create(name, 100, image_size=s).eval()
        x = torch.empty(1, 3, s, s)
    indices, selected = OURS.get(name, (None, None))
    with BlockFeatures(model) as rec:
        _, logits = model(x)
        maps = rec.features
    assert [tuple(f.shape[1:]) for f in maps] == EXPECTED[name]
    assert all(f.shape[0] == 1 for f in maps)
    assert block_feature_dims(model) == [c for c, _, _ in EXPECTED[name]]
    if indices is not None:
        assert [tuple(maps[i].shape[1:]) for i in indices] == selected
    assert logits.shape == (1, 100)
    assert not model._forward_hooks and not model._forward_pre_hooks  # removed on exit
    assert all(not tap.module._forward_hooks for tap in block_taps(model))


def test_tokens_are_the_block_output_without_the_special_tokens():
    # DeiT with a distillation token: the map is block output tokens 2.. laid on the 8x8 grid.
    model = create("deit_tiny_distilled", 5, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    outputs = []
    handle = model.body.blocks[4].register_forward_hook(lambda m, a, out: outputs.append(out))
    with torch.no_grad():
        maps = block_features(model, x, indices=[4])
    handle.remove()
    tokens = outputs[0]
    assert tokens.shape == (2, 2 + 64, 192)
    expected = tokens[:, 2:].transpose(1, 2).reshape(2, 192, 8, 8)
    torch.testing.assert_close(maps[0], expected, rtol=0, atol=0)


def test_convit_drops_the_class_token_only_where_it_exists():
    model = create("convit_tiny", 5, image_size=32).eval()
    prefixes = [tap.prefix_tokens for tap in block_taps(model)]
    assert prefixes == [0] * 10 + [1] * 2
    with torch.no_grad():
        maps = block_features(model, torch.randn(1, 3, 32, 32))
    assert {tuple(f.shape) for f in maps} == {(1, 192, 8, 8)}


def test_features_are_taken_before_the_final_norm_and_carry_gradients():
    model = create("t2t_vit_7", 5, image_size=32).train()
    with BlockFeatures(model) as rec:
        features, logits = model(torch.randn(2, 3, 32, 32))
        last = rec.features[-1]
    # the final norm of the class token gives the features; the last map is the raw block output
    assert last.shape == (2, 256, 2, 2)
    # a LayerNorm (weight 1, bias 0 at init) would give every token a channel mean of 0
    assert float(last.detach().mean(1).abs().max()) > 1e-3
    last.sum().backward()
    assert model.layers[-1].mlp.fc2.weight.grad is not None


def test_features_are_refreshed_each_forward_and_indices_select():
    model = create("pvt_tiny", 5, image_size=32).eval()
    with torch.no_grad(), BlockFeatures(model, indices=[0, 3, 7]) as rec:
        model(torch.randn(1, 3, 32, 32))
        first = rec.features
        model(torch.randn(1, 3, 32, 32))
        assert len(rec.features) == 3 and rec.features is not first
        assert rec.channels == [64, 128, 512]
    with pytest.raises(IndexError, match="out of range: the model has 8 taps"):
        BlockFeatures(model, indices=[8])


def test_a_model_without_taps_is_a_clear_error():
    with pytest.raises(TypeError, match="no per-block features"):
        block_taps(create("resnet18", 5))


def test_taps_are_found_through_a_compiled_wrapper():
    model = create("resnet56", 5)
    taps = block_taps(torch.compile(model))  # compiles nothing until called
    assert [t.module for t in taps] == [model.s1, model.s2, model.s3]
