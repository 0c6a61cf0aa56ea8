"""What the op returns besides the loss: the row_stats columns (named by the compiled extension)
and the parts, checked against float64 math written from their definitions; and the op's
autograd living in C++ (registered for the Autograd key, traced by torch.compile)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_worst

import spacedkd_fast as sk
from spacedkd_fast import ops
from spacedkd_fast.ops import kd_op


def test_row_stats_columns_come_from_the_extension():
    names = kd_op._C.build_info()["row_stats"]
    assert ops.ROW_STATS == tuple(names)
    assert (ops.ROW_CE, ops.ROW_KL) == (names.index("ce"), names.index("kl"))


def test_row_stats_columns_hold_what_their_names_say():
    T = 2.5
    s = torch.randn(12, 33, dtype=torch.float64) * 4
    t = torch.randn(12, 33, dtype=torch.float64) * 4
    y = torch.randint(0, 33, (12,))
    y[3] = -100
    _, stats, _, count, parts = ops.kd_loss_forward(s, t, y, T, 0.3, 1.0, -100, "mean")
    col = {name: stats[:, k] for k, name in enumerate(ops.ROW_STATS)}
    kept = y != -100
    max_s, max_t = s.max(1).values, t.max(1).values
    expected = {
        "max_student": max_s,
        "max_teacher": max_t,
        "log_z_student": (s - max_s[:, None]).exp().sum(1).log(),
        "log_z_student_T": ((s - max_s[:, None]) / T).exp().sum(1).log(),
        "log_z_teacher_T": ((t - max_t[:, None]) / T).exp().sum(1).log(),
        "ce": F.cross_entropy(s, y.clamp(min=0), reduction="none"),
        "kl": F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), log_target=True,
                       reduction="none").sum(1),
    }
    assert set(expected) == set(ops.ROW_STATS)
    for name, value in expected.items():
        assert_close_worst(col[name][kept], value[kept], atol=1e-10, rtol=1e-10, what=name)
        assert (col[name][~kept] == 0).all(), f"{name} of an ignored row"
    assert count.item() == kept.sum().item()
    assert_close_worst(parts, torch.stack([expected["ce"][kept].mean(), expected["kl"][kept].mean()]),
                       atol=1e-10, rtol=1e-10, what="parts")


def test_autograd_is_registered_in_cpp_for_the_autograd_key():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("spacedkd::kd_loss_forward", "Autograd")
    s = torch.randn(4, 6, requires_grad=True)
    loss = sk.kd_loss(s, torch.randn(4, 6), torch.randint(0, 6, (4,)))
    # A C++ node: torch.autograd.Function nodes from Python are BackwardCFunction instances.
    assert not isinstance(loss.grad_fn, torch.autograd.function.BackwardCFunction)
    assert "KDLoss" in loss.grad_fn.name()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_with_parts(reduction):
    s = torch.randn(16, 40)
    t = torch.randn(16, 40)
    y = torch.randint(0, 40, (16,))
    y[::5] = -100

    def step(student, teacher, target):
        loss, ce, kl = sk.kd_loss(student, teacher, target, temperature=2.0, alpha=0.5,
                                  reduction=reduction, return_parts=True)
        return loss.sum() * 3.0, ce, kl

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out_c, out_e = compiled(s1, t, y), step(s2, t, y)
    out_c[0].backward()
    out_e[0].backward()
    for got, want in zip(out_c, out_e):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)
