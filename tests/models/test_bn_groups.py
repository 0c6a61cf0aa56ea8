"""--bn-groups: BatchNorm over slices of the batch against a hand-made N-replica forward.

The reference builds what N-way DataParallel does from its documented rules, without our code:
N deep copies of the model, replica i gets ``chunk(x, N)[i]``, outputs concatenated; only replica
0's buffers are kept (it shares them with the real module); gradients are the sum over replicas.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spacedkd_fast.models.bn_groups import apply_bn_groups


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3),
    ).double()


def replicas_reference(model: nn.Module, x: torch.Tensor, groups: int):
    replicas = [copy.deepcopy(model) for _ in torch.chunk(x, groups)]
    outs = [r(part) for r, part in zip(replicas, torch.chunk(x, groups))]
    return replicas, torch.cat(outs)


@pytest.mark.parametrize("groups,batch", [(2, 16), (2, 15), (4, 16), (3, 8)])
def test_matches_n_replicas(groups, batch):
    torch.manual_seed(0)
    model = small_net().train()
    ref_model = copy.deepcopy(model)
    x = torch.randn(batch, 3, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,))

    apply_bn_groups(model, groups)
    out = model(x)
    replicas, ref_out = replicas_reference(ref_model, x, groups)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)

    nn.functional.cross_entropy(out, y).backward()
    nn.functional.cross_entropy(ref_out, y).backward()
    for (name, p), *ps in zip(model.named_parameters(), *(r.parameters() for r in replicas)):
        expected = sum(q.grad for q in ps)
        torch.testing.assert_close(p.grad, expected, rtol=1e-10, atol=1e-12, msg=name)
    # running statistics follow replica 0 only
    for (name, b), b0 in zip(model.named_buffers(), replicas[0].buffers()):
        torch.testing.assert_close(b, b0, rtol=0, atol=0, msg=name)


def test_statistics_really_are_per_slice():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(2).double().train()
    x = torch.cat([torch.zeros(4, 2), torch.full((4, 2), 10.0)]).double() + torch.randn(8, 2).double()
    plain = bn(x)
    apply_bn_groups(bn, 2)
    sliced = bn(x)
    for half in (sliced[:4], sliced[4:]):  # each half normalised on its own: mean 0
        torch.testing.assert_close(half.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not torch.allclose(plain[:4].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-3)


def test_eval_and_state_dict_unchanged_and_reversible():
    torch.manual_seed(0)
    model = small_net()
    keys = list(model.state_dict())
    ref = copy.deepcopy(model).eval()
    apply_bn_groups(model, 2)
    assert list(model.state_dict()) == keys
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    model.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
    apply_bn_groups(model, 1)
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_groups(bad):
    with pytest.raises(ValueError, match="bn groups must be a positive int"):
        apply_bn_groups(small_net(), bad)
