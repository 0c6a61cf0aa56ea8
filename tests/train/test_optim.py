"""Optimisers with the official weight-decay groups (OFFICIAL_VIT_FACTS.md section 1.5): decay only
tensors with ndim > 1 whose name neither ends in ``.bias`` nor holds a token name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from spacedkd_fast.train.optim import build_optimizer, param_groups


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 4))
        self.dist_token = nn.Parameter(torch.randn(1, 1, 4))
        self.distill_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pit_pos_embed = nn.Parameter(torch.randn(1, 4, 3, 3))
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)
        self.gate = nn.Parameter(torch.ones(2))
        self.frozen = nn.Parameter(torch.randn(3, 3), requires_grad=False)


DECAYED = {"conv.weight", "head.weight"}
NOT_DECAYED = {"cls_token", "pos_embed", "dist_token", "distill_token", "pit_pos_embed",
               "conv.bias", "norm.weight", "norm.bias", "head.bias", "gate"}


def _cfg(**over):
    values = dict(optimizer="adamw", lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.05,
                  weight_decay_groups="official")
    values.update(over)
    return SimpleNamespace(**values)


def _names(model: nn.Module, tensors) -> set[str]:
    ids = {id(p) for p in tensors}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_official_groups_on_every_kind_of_tensor():
    model = _Toy()
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    assert _names(model, groups["decay"]["params"]) == DECAYED
    assert _names(model, groups["no_decay"]["params"]) == NOT_DECAYED  # frozen: in no group
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.05, 0.0)


def test_adamw_step_decays_only_the_decay_group():
    # With zero gradients AdamW's update is the decoupled decay alone: p <- p * (1 - lr * wd).
    model = _Toy()
    before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    opt = build_optimizer(_cfg(), model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for name, p in model.named_parameters():
        want = before[name] * (1 - 0.1 * 0.05) if name in DECAYED else before[name]
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=0)


def test_all_groups_is_one_group_like_torch_and_takes_bare_parameters():
    model = _Toy()
    opt = build_optimizer(_cfg(weight_decay_groups="all", optimizer="sgd"), model.parameters())
    assert len(opt.param_groups) == 1
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    assert opt.param_groups[0]["weight_decay"] == 0.05


def test_official_groups_need_names():
    with pytest.raises(TypeError, match="needs parameter names"):
        build_optimizer(_cfg(), _Toy().parameters())


def test_several_modules_and_named_pairs():
    a, b = _Toy(), _Toy()
    groups = {g["name"]: g for g in param_groups([a, b], 0.05)}
    assert len(groups["decay"]["params"]) == 2 * len(DECAYED)
    pairs = {g["name"]: g for g in param_groups(list(a.named_parameters()), 0.05)}
    assert _names(a, pairs["decay"]["params"]) == DECAYED


def test_sgd_nesterov_matches_the_update_rule():
    # SGD with momentum m, Nesterov, weight decay wd: g' = g + wd p; buf = m buf + g'; p -= lr (g' + m buf)
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = build_optimizer(_cfg(optimizer="sgd", nesterov=True, weight_decay_groups="all"), [p])
    want, buf = p.detach().clone(), torch.zeros(2, dtype=torch.float64)
    for g in (torch.tensor([0.5, 0.25], dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64)):
        p.grad = g.clone()
        opt.step()
        g2 = g + 0.05 * want
        buf = 0.9 * buf + g2  # the first step sets buf = g2
        want = want - 0.1 * (g2 + 0.9 * buf)
    torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("arch, no_decay_tokens, frozen", [
    ("deit_tiny_distilled", {"body.cls_token", "body.pos_embed", "body.dist_token"}, set()),
    ("pit_tiny", {"body.cls_token", "body.pos_embed"}, set()),
    ("pvt_tiny", {"cls_token", *{f"pos_embed{i}" for i in range(1, 5)}}, set()),
    ("cvt_13", {"stage2.cls_token"}, set()),
    ("t2t_vit_7", {"cls_token"}, {"pos_embed", "t2t_module.attention.0.attn.w",
                                  "t2t_module.attention.1.attn.w"}),
])
def test_the_official_models_tokens_are_not_decayed(arch, no_decay_tokens, frozen):
    from spacedkd_fast.models import create

    model = create(arch, 100, image_size=224)
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    decay, no_decay = (_names(model, groups[k]["params"]) for k in ("decay", "no_decay"))
    params = dict(model.named_parameters())
    assert no_decay_tokens <= no_decay and not no_decay_tokens & decay
    assert not frozen & (decay | no_decay)
    # everything else: decayed exactly when it is a >1-D tensor that is not a bias
    for name in set(params) - no_decay_tokens - frozen:
        assert (name in decay) == (params[name].ndim > 1 and not name.endswith(".bias")), name


def test_the_official_resnet56_recipe_builds_nesterov_sgd_without_decay_on_batchnorm():
    from spacedkd_fast.models import create
    from spacedkd_fast.train.config import build_config, load_yaml

    cfg = build_config(load_yaml("r-56_c100"))
    model = create(cfg.arch, 100, image_size=cfg.image_size)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD)
    groups = {g["name"]: g for g in opt.param_groups}
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["dampening"] == 0 for g in opt.param_groups)
    assert groups["decay"]["weight_decay"] == 5e-4 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim == 4 or p.ndim == 2 for p in groups["decay"]["params"])  # convs and the fc
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])  # BatchNorm and biases
