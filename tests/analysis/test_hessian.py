"""Hutchinson's Hessian trace against the exact trace of a small model, and the loss profile."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.toys import one_thread  # noqa: F401 (autouse: tiny ops, busy cores)
from torch import nn

from spacedkd_fast.analysis.hessian import (
    filter_normalized_direction,
    hessian_trace,
    loss_profile,
)


class TinyNet(nn.Module):
    """Linear -> BatchNorm -> tanh -> Linear, returning (features, logits) like the zoo's models."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc1(x)))
        return h, self.fc2(h)


def _model_and_data():
    torch.manual_seed(0)
    model = TinyNet().double()
    with torch.no_grad():  # non-trivial running statistics, so eval and train BN differ
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(50, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (50,))
    batches = [(x[:17], y[:17]), (x[17:], y[17:])]  # unequal sizes: rows weigh, not batches
    return model, x, y, batches


def _exact_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr(H) of the mean CE over all rows, from the full Hessian (autograd), BN in eval mode."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = dict(model.named_buffers())

    def loss(v):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            k = math.prod(shape)
            params[name] = v[i:i + k].reshape(shape)
            i += k
        _, logits = torch.func.functional_call(model, {**params, **buffers}, (x,))
        return nn.functional.cross_entropy(logits, y)

    model.eval()
    try:
        return torch.autograd.functional.hessian(loss, flat).trace().item()
    finally:
        model.train()


@pytest.fixture(scope="module")
def exact_trace():
    model, x, y, _ = _model_and_data()
    return _exact_trace(model, x, y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hutchinson_matches_exact_trace_within_three_standard_errors(seed, exact_trace):
    model, x, y, batches = _model_and_data()
    exact = exact_trace
    est = hessian_trace(model, batches, samples=64, seed=seed)
    assert est.samples == 64 and est.num_samples == 50
    assert est.num_params == sum(p.numel() for p in model.parameters())
    assert est.stderr > 0
    assert abs(est.trace - exact) <= 3 * est.stderr, (
        f"seed {seed}: estimate {est.trace:.4f} ± {est.stderr:.4f}, exact {exact:.4f} "
        f"({(est.trace - exact) / est.stderr:+.2f} s.e.)")


def test_hutchinson_is_reproducible_and_leaves_the_model_alone():
    model, x, y, batches = _model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = hessian_trace(model, batches, samples=8, seed=3)
    b = hessian_trace(model, batches, samples=8, seed=3)
    assert a.per_probe == b.per_probe
    assert model.training  # mode restored
    for k, v in model.state_dict().items():  # BN statistics and weights untouched
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_hutchinson_rejects_too_few_samples():
    model, _, _, batches = _model_and_data()
    with pytest.raises(ValueError, match="samples"):
        hessian_trace(model, batches, samples=1)


def test_filter_normalized_direction_has_the_weights_filter_norms():
    model, _, _, _ = _model_and_data()
    direction = filter_normalized_direction(model, seed=0)
    for p, d in zip(model.parameters(), direction):
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0
        else:
            torch.testing.assert_close(d.reshape(p.shape[0], -1).norm(dim=1),
                                       p.detach().reshape(p.shape[0], -1).norm(dim=1))


def test_loss_profile_centre_is_the_model_and_weights_are_restored():
    model, x, y, batches = _model_and_data()
    before = [p.detach().clone() for p in model.parameters()]
    prof = loss_profile(model, batches, alphas=[-0.5, 0.0, 0.5], seed=1)
    model.eval()
    with torch.no_grad():
        _, logits = model(x)
    model.train()
    assert prof["alpha"] == [-0.5, 0.0, 0.5]
    assert prof["loss"][1] == pytest.approx(nn.functional.cross_entropy(logits, y).item(),
                                            rel=1e-12)
    assert prof["top1"][1] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert prof["loss"][0] != prof["loss"][1]
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)


def test_batches_are_weighted_by_their_rows():
    """Same probes: the estimate over two unequal batches equals the one over a single batch."""
    model, x, y, batches = _model_and_data()
    split = hessian_trace(model, batches, samples=6, seed=5)
    whole = hessian_trace(model, [(x, y)], samples=6, seed=5)
    assert split.per_probe == pytest.approx(whole.per_probe, rel=1e-10)


def test_parameters_the_loss_does_not_use_have_zero_hessian_rows():
    model, x, y, batches = _model_and_data()
    model.spare = nn.Parameter(torch.ones(3, dtype=torch.float64))  # never used in forward
    est = hessian_trace(model, batches, samples=4, seed=0)
    assert est.num_params == sum(p.numel() for p in model.parameters())
    assert all(math.isfinite(v) for v in est.per_probe)
