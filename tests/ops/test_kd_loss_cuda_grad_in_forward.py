"""The opt-in CUDA path (``SPACEDKD_CUDA_GRAD_IN_FORWARD=1``): the forward kernel writes the
gradient, scaled for the mean in-kernel from a count pre-pass (one exp fewer per element for
T = 1), and the backward scales it in place on the device (no work for gradient 1). Checked
against the float64 reference; runs under benchmarks/gpu_check.sh (needs a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_worst

import spacedkd_fast as sk
from spacedkd_fast.ops import kd_op
from spacedkd_fast.ops.reference import kd_loss_float64

pytestmark = pytest.mark.cuda

GRAD_TOL = {torch.float32: (2e-6, 2e-5), torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 1e-3)}
LOSS_TOL = (1e-5, 2e-6)


@pytest.fixture
def grad_in_forward(monkeypatch):
    monkeypatch.setattr(kd_op, "CUDA_GRAD_IN_FORWARD", True)


def inputs(B, C, dtype, ignore_every=0):
    s = (torch.randn(B, C, dtype=torch.float64) * 3).to("cuda", dtype)
    t = (torch.randn(B, C, dtype=torch.float64) * 3).to("cuda", dtype)
    y = torch.randint(0, C, (B,), device="cuda")
    if ignore_every:
        y[::ignore_every] = -100
    return s, t, y


@pytest.mark.parametrize("dtype", list(GRAD_TOL), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("C", [31, 100, 1024, 1025, 40000], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("reduction,grad_output", [("mean", 1.0), ("mean", 2.5), ("sum", 1.0),
                                                   ("sum", -0.5)])
def test_matches_float64_reference(grad_in_forward, dtype, C, temperature, reduction,
                                   grad_output):
    s, t, y = inputs(13, C, dtype, ignore_every=5)
    s_k = s.clone().requires_grad_(True)
    loss = sk.kd_loss(s_k, t, y, temperature=temperature, alpha=0.3, reduction=reduction)
    s_r = s.double().requires_grad_(True)
    ref = kd_loss_float64(s_r, t, y, temperature=temperature, alpha=0.3, reduction=reduction)
    assert_close_worst(loss, ref, atol=LOSS_TOL[0], rtol=LOSS_TOL[1], what="loss")
    (loss * grad_output).backward()
    (ref * grad_output).backward()
    atol, rtol = GRAD_TOL[dtype]
    assert_close_worst(s_k.grad, s_r.grad, atol=atol * s_r.grad.abs().max().item(), rtol=rtol,
                       what=f"grad {dtype} C={C} T={temperature} {reduction} x{grad_output}")
    assert (s_k.grad[y == -100] == 0).all()


def test_all_rows_ignored_gives_zero_gradient(grad_in_forward):
    s, t, y = inputs(6, 50, torch.float32)
    y.fill_(-100)
    s.requires_grad_(True)
    loss = sk.kd_loss(s, t, y)
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


def test_second_backward_through_retained_graph_is_refused(grad_in_forward):
    """The first backward scales the saved gradient in place and hands it out; a second one
    must fail autograd's version check rather than reuse scaled values."""
    s, t, y = inputs(8, 20, torch.float32)
    s.requires_grad_(True)
    loss = sk.kd_loss(s, t, y)
    (loss * 2.0).backward(retain_graph=True)
    first = s.grad.clone()
    s_r = s.detach().double().requires_grad_(True)
    (kd_loss_float64(s_r, t, y) * 2.0).backward()
    assert_close_worst(first, s_r.grad, atol=2e-6 * s_r.grad.abs().max().item(), rtol=2e-5,
                       what="first backward")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_rows_starting_off_a_16_byte_boundary(grad_in_forward, dtype):
    """Contiguous logits whose storage starts one element past an aligned address: the rows of
    student, teacher and gradient then sit at different offsets from a 16-byte boundary, which
    takes the scalar loads; C = 100 with both aligned takes the peeled 16-byte loads."""
    B, C = 11, 100
    s, t, y = inputs(B, C, dtype, ignore_every=4)
    shifted = torch.empty(B * C + 1, dtype=dtype, device="cuda")[1:].view(B, C)
    shifted.copy_(s)
    for student in (shifted, s):
        s_k = student.detach().clone() if student is s else student.detach()
        s_k.requires_grad_(True)
        loss = sk.kd_loss(s_k, t, y, temperature=2.0, alpha=0.5)
        loss.backward()
        s_r = s.double().requires_grad_(True)
        kd_loss_float64(s_r, t, y, temperature=2.0, alpha=0.5).backward()
        atol, rtol = GRAD_TOL[dtype]
        assert_close_worst(s_k.grad, s_r.grad, atol=atol * s_r.grad.abs().max().item(),
                           rtol=rtol, what=f"offset {s_k.data_ptr() % 16}")
