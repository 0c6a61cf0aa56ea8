"""Fused KD loss vs the eager composition and torch.compile of it: forward, backward, both.

Eager = ``spacedkd_fast.ops.reference.kd_loss_eager`` (cross_entropy + kl_div(log_softmax, softmax)),
the same composition the tests use. Ratios are eager median / provider median in one run.
On CUDA the table also reports achieved GB/s against the 3-pass minimum (read student, read
teacher, write the gradient) for the fused forward+backward.

CPU providers include both gradient strategies of ops.py: ``fused`` (the default: on CPU the
gradient is written during the forward) and ``fused, backward kernel`` (saved row statistics,
gradient recomputed in the backward, the CUDA default).
"""

from __future__ import annotations

import pytest
import torch
from conftest import QUICK, sync

import spacedkd_fast as sk
from spacedkd_fast import ops
from spacedkd_fast.ops.reference import kd_loss_eager

T, ALPHA = 3.0, 0.3
CPU_SHAPES = [(128, 100), (256, 200), (1024, 1000)]
CUDA_SHAPES = [(128, 100), (1024, 1000), (4096, 1000), (4096, 32000)]
MODES = ["forward", "backward", "both"]

HAS_CUDA = torch.cuda.is_available()


def fused(s, t, y):
    return sk.kd_loss(s, t, y, temperature=T, alpha=ALPHA)


def fused_backward_kernel(s, t, y):
    """The fused loss with the gradient recomputed in the backward kernel (no grad in forward)."""
    return ops.kd_loss_forward(s, t, y, T, ALPHA, T * T, -100, "mean", False)[0]


def eager(s, t, y):
    return kd_loss_eager(s, t, y, temperature=T, alpha=ALPHA)


_compiled = {}


def compiled(s, t, y):
    fn = _compiled.get("fn")
    if fn is None:
        fn = _compiled["fn"] = torch.compile(eager, fullgraph=True, dynamic=False)
    return fn(s, t, y)


def providers(device):
    out = [("eager", eager, True), ("fused", fused, False), ("torch.compile", compiled, False)]
    if device == "cpu":
        out.append(("fused, backward kernel", fused_backward_kernel, False))
    return out


def cases():
    params = []
    for shape in CPU_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            params.append(pytest.param("cpu", dtype, shape, id=f"cpu-{str(dtype)[6:]}-{shape[0]}x{shape[1]}"))
    for shape in CUDA_SHAPES:
        params.append(pytest.param("cuda", torch.bfloat16, shape, marks=pytest.mark.cuda,
                                   id=f"cuda-bfloat16-{shape[0]}x{shape[1]}"))
    return params


def calls_per_round(shape, device):
    """Enough calls per round that one round is well above timer resolution."""
    elems = shape[0] * shape[1]
    if device == "cuda":
        return 20
    return max(1, min(50, 2_000_000 // max(elems, 1) // 10))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device,dtype,shape", cases())
@pytest.mark.parametrize("provider", ["eager", "fused", "torch.compile", "fused, backward kernel"])
def test_kd_loss_speed(bench, provider, device, dtype, shape, mode):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs CUDA")
    table = {name: (fn, base) for name, fn, base in providers(device)}
    if provider not in table:
        pytest.skip(f"{provider} is a CPU-only comparison")
    if QUICK and provider == "torch.compile" and (dtype != torch.float32 or mode != "both"):
        pytest.skip("quick mode compiles only float32 forward+backward (compiles are slow on CPU)")
    fn, baseline = table[provider]
    B, C = shape
    gen = torch.Generator().manual_seed(0)
    s0 = (torch.randn(B, C, generator=gen) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(B, C, generator=gen) * 3).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (B,), generator=gen).to(device)
    group = f"kd_loss {mode:<8} {device} {str(dtype)[6:]:<8} {B}x{C}"
    extra = dict(mode=mode, shape=[B, C], dtype=str(dtype), device_type=device)
    if device == "cuda":
        extra["min_bytes"] = 3 * B * C * s0.element_size()

    if mode == "backward":
        def setup():
            s = s0.clone().requires_grad_(True)
            loss = fn(s, t, y)
            sync(device)
            return (loss,), {}

        def run(loss):
            loss.backward()
            sync(device)

        bench(run, setup=setup, group=group, provider=provider, baseline=baseline,
              device=device, rounds=10 if QUICK else 60, warmup=2, **extra)
        return

    s = s0.clone().requires_grad_(True)

    def run_forward():
        fn(s, t, y)
        sync(device)

    def run_both():
        s.grad = None
        fn(s, t, y).backward()
        sync(device)

    bench(run_forward if mode == "forward" else run_both, group=group, provider=provider,
          baseline=baseline, device=device, warmup=2, iterations=calls_per_round(shape, device),
          rounds=5 if QUICK else 20, **extra)
