"""Bad input to the fused KD loss: one clear error naming the contract (or a NaN loss where the
contract says so), through the Python wrapper and through the op directly."""

from __future__ import annotations

import pytest
import torch

import spacedkd_fast as sk
from spacedkd_fast import ops


def _good():
    B, C = 4, 5
    return torch.randn(B, C), torch.randn(B, C), torch.randint(0, C, (B,))


@pytest.mark.parametrize("mutate,exc,pattern", [
    (lambda s, t, y: (s, t[:, :4], y), ValueError, "same shape"),
    (lambda s, t, y: (s[0], t[0], y), ValueError, "2-D"),
    (lambda s, t, y: (s.long(), t.long(), y), TypeError, "floating point"),
    (lambda s, t, y: (s, t.double(), y), TypeError, "same dtype"),
    (lambda s, t, y: (s, t, y[:3]), ValueError, "target must be 1-D"),
    (lambda s, t, y: (s, t, y[:, None]), ValueError, "target must be 1-D"),
    (lambda s, t, y: (s, t, y.int()), TypeError, "int64"),
    (lambda s, t, y: (s, t, y.float()), TypeError, "int64"),
    (lambda s, t, y: (s[:, :0], t[:, :0], y), ValueError, "at least one class"),
    (lambda s, t, y: (s.tolist(), t, y), TypeError, "torch.Tensor"),
])
def test_bad_tensors(mutate, exc, pattern):
    s, t, y = mutate(*_good())
    with pytest.raises(exc, match=pattern):
        sk.kd_loss(s, t, y)


def test_target_out_of_range_is_an_error_naming_the_row():
    s, t, y = _good()
    y[2] = 5
    with pytest.raises(IndexError, match=r"target\[2\] = 5 is outside \[0, 5\)"):
        sk.kd_loss(s, t, y)
    y[2] = -3
    with pytest.raises(IndexError, match=r"target\[2\] = -3"):
        sk.kd_loss(s, t, y)


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ({"temperature": -1.0}, ValueError, "temperature must be > 0"),
    ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
    ({"alpha": 1.5}, ValueError, "alpha must be <= 1"),
    ({"alpha": -0.1}, ValueError, "alpha must be >= 0"),
    ({"kd_scale": float("inf")}, ValueError, "kd_scale must be finite"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index must be an int"),
])
def test_bad_arguments(kwargs, exc, pattern):
    s, t, y = _good()
    with pytest.raises(exc, match=pattern):
        sk.kd_loss(s, t, y, **kwargs)


def test_op_level_checks_hold_without_the_python_wrapper():
    """The C++ checks, reached directly through torch.ops (the wrapper's checks bypassed)."""
    s, t, y = _good()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ops.kd_loss_forward(s, t, y, 0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        ops.kd_loss_forward(s, t, y, 1.0, 2.0, 1.0)
    _, stats, _, count, _ = ops.kd_loss_forward(s, t, y, 1.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="row_stats must be"):
        ops.kd_loss_backward(torch.ones(4), s, t, y, stats[:, :3], count, 1.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="grad_loss must be a scalar"):
        ops.kd_loss_backward(torch.ones(4), s, t, y, stats, count, 1.0, 0.5, 1.0, -100, "mean")
    with pytest.raises(ValueError, match="reduction must be 0"):
        torch.ops.spacedkd.kd_loss_forward(s, t, y, 1.0, 0.5, 1.0, -100, 7, False)


def test_non_finite_logits_give_nan_loss_not_garbage():
    s, t, y = _good()
    s[1, 2] = float("nan")
    assert torch.isnan(sk.kd_loss(s, t, y))
    s, t, y = _good()
    t[0, 0] = float("inf")
    assert torch.isnan(sk.kd_loss(s, t, y))
