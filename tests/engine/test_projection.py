"""The projection head of SPEC section 2 (student features -> teacher feature width)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spacedkd_fast.engine.projection import ProjectionHead


def test_projection_head_shape_and_math():
    head = ProjectionHead(64, 256).double()
    first, relu, second = head.net
    assert isinstance(relu, nn.ReLU)
    assert (first.in_features, first.out_features) == (64, 160)
    assert (second.in_features, second.out_features) == (160, 256)
    f = torch.randn(5, 64, dtype=torch.float64)
    hidden = (f @ first.weight.T + first.bias).clamp_min(0)
    torch.testing.assert_close(head(f), hidden @ second.weight.T + second.bias)


def test_projection_head_errors():
    with pytest.raises(ValueError, match="student_dim"):
        ProjectionHead(0, 10)
    with pytest.raises(ValueError, match=r"\[B, 64\]"):
        ProjectionHead(64, 10)(torch.randn(2, 32))
