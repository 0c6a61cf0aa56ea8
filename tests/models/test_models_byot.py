"""The four-exit self-KD ResNet (SPEC section 4): wiring, exits, adapters, attention masks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spacedkd_fast.models import create
from spacedkd_fast.models.byot import AttentionMask, SepConv


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def byot18():
    torch.manual_seed(1)
    return create("byot_resnet18", 10, downsample_factor=4)


def test_interface(byot18):
    assert byot18.num_exits == 4
    assert byot18.feature_dim == 256  # 512 / sqrt(4)
    assert isinstance(byot18.adapters, nn.ModuleList) and len(byot18.adapters) == 3
    for adapter in byot18.adapters:
        assert isinstance(adapter, nn.Linear)
        assert (adapter.in_features, adapter.out_features) == (256, 256)
    ids = {id(p) for p in byot18.parameters()}
    assert all(id(p) in ids for p in byot18.adapters.parameters())
    assert any(k.startswith("adapters.") for k in byot18.state_dict())


def test_full_width_dims():
    for depth, dim in ((18, 512), (50, 2048)):
        model = create(f"byot_resnet{depth}", 10)
        assert model.feature_dim == dim
        assert all(a.in_features == a.out_features == dim for a in model.adapters)
        assert all(c.in_features == dim for c in model.classifiers)


def test_exit_branches_are_sepconv_stacks_to_512e():
    model = create("byot_resnet50", 10, downsample_factor=16)  # widths 16..128, expansion 4
    assert model.feature_dim == 512
    for i, (branch, stage_out) in enumerate(zip(model.branches, (64, 128, 256))):
        assert len(branch) == 3 - i  # one SepConv per doubling
        assert all(isinstance(b, SepConv) for b in branch)
        channels = [stage_out] + [b.op[-2].num_features for b in branch]
        assert channels == [stage_out * 2**k for k in range(4 - i)]
    assert all(isinstance(a, AttentionMask) for a in model.attentions)


def test_width_factor_that_does_not_divide_evenly():
    model = create("byot_resnet18", 10, downsample_factor=3).eval()
    widths = [int(c / 3**0.5) for c in (64, 128, 256, 512)]  # 36, 73, 147, 295
    assert model.feature_dim == widths[3]
    assert [b.op[-2].num_features for b in model.branches[0]] == widths[1:]
    with torch.no_grad():
        features, _ = model(torch.randn(1, 3, 32, 32))
    assert all(f.shape == (1, widths[3]) for f in features)


def test_deepest_exit_is_last_and_equals_the_plain_resnet(byot18):
    """Exit 4 must be layer4 + pool + fc: load the shared weights into a plain CIFAR ResNet."""
    plain = create("resnet18", 10, downsample_factor=4)
    state = {k.replace("classifiers.3.", "fc."): v for k, v in byot18.state_dict().items()}
    state = {k: v for k, v in state.items() if k in plain.state_dict()}
    plain.load_state_dict(state, strict=True)
    byot18.eval(), plain.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = byot18(x)
        ref_features, ref_logits = plain(x)
    torch.testing.assert_close(logits[-1], ref_logits)
    torch.testing.assert_close(features[-1], ref_features)


def _grad_owners(model, output):
    model.zero_grad(set_to_none=True)
    output.sum().backward(retain_graph=True)
    return {n.split(".")[0] + ("." + n.split(".")[1] if n.split(".")[0] in
            ("attentions", "branches", "classifiers") else "")
            for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}  # fmt: skip


def test_each_exit_reads_only_the_stages_it_should(byot18):
    byot18.train()
    features, logits = byot18(torch.randn(4, 3, 32, 32))
    trunk = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    for i in range(4):
        owners = _grad_owners(byot18, logits[i])
        expected = set(trunk[: 3 + i]) | {f"classifiers.{i}"}
        if i < 3:
            expected |= {f"attentions.{i}", f"branches.{i}"}
        assert owners == expected, f"exit {i + 1}: {sorted(owners ^ expected)}"


def test_attention_mask_is_a_sigmoid_gate_of_the_input_shape():
    mask = AttentionMask(8).eval()
    x = torch.randn(2, 8, 16, 16)
    gate = mask.mask(x)
    assert gate.shape == x.shape
    assert ((gate > 0) & (gate < 1)).all()
    torch.testing.assert_close(mask(x), gate * x)
    # the SepConv inside halves the resolution before the x2 bilinear upsampling
    assert mask.mask[0](x).shape[-1] == 8
    assert isinstance(mask.mask[3], nn.Upsample) and mask.mask[3].mode == "bilinear"


def test_every_exit_pools_a_4x4_map_at_32px(byot18):
    """As in the official code (AvgPool2d(4)), each exit reaches 4x4 before pooling at 32 px."""
    seen = []
    hooks = [byot18.pool.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[-2:]))]
    byot18.eval()
    with torch.no_grad():
        byot18(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert seen == [torch.Size([4, 4])] * 4
