"""Fused KD loss vs the eager composition and torch.compile of it: forward, backward, both.

Eager = ``spacedkd_fast.ops.reference.kd_loss_eager`` (cross_entropy + kl_div(log_softmax, softmax)),
the same composition the tests use. Two kinds of figures:

- ``test_kd_loss_speed``: wall time per call as a user's loop sees it (host work, and on CUDA a
  synchronize per call, included); ratios are eager median / provider median in one run. This is
  the figure for host-bound shapes such as [128, 100].
- ``test_kd_loss_cuda_device_time`` (CUDA only): device time per call from CUDA events with the
  host excluded (the stream is kept busy by a sleep kernel while the calls are queued, so the GPU
  runs them back to back), host time per call (the time to queue one call) reported apart, and a
  ``copy_`` of the same bytes (the minimum traffic of the mode: read both logits, and write the
  gradient for forward+backward) timed the same way as the bandwidth yardstick. The table is
  printed and, with ``SPACEDKD_BENCH_KERNEL_JSON=path``, appended to that file as JSON lines.

Providers cover both gradient strategies of ``spacedkd_fast/ops/kd_op.py``: ``fused`` (the
default: on CPU the gradient is written during the forward, on CUDA recomputed by the backward
kernel) and the other one (``fused, backward kernel`` on CPU, ``fused, grad in forward`` on CUDA).
"""

from __future__ import annotations

import json
import os
import time

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


def fused_grad_in_forward(s, t, y):
    """The fused loss with the gradient written by the forward kernel (the CPU default)."""
    return ops.kd_loss_forward(s, t, y, T, ALPHA, T * T, -100, "mean", s.requires_grad)[0]


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
    else:
        out.append(("fused, grad in forward", fused_grad_in_forward, False))
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
@pytest.mark.parametrize("provider", ["eager", "fused", "torch.compile", "fused, backward kernel",
                                      "fused, grad in forward"])
def test_kd_loss_speed(bench, provider, device, dtype, shape, mode):
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs CUDA")
    table = {name: (fn, base) for name, fn, base in providers(device)}
    if provider not in table:
        pytest.skip(f"{provider} is not compared on {device}")
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
        extra["note"] = "wall time, host + synchronize included"

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


# ---- CUDA: device time with the host excluded, host time apart, copy_ as the yardstick -------

DEVICE_PROVIDERS = [("eager", eager), ("fused", fused), ("fused, grad in forward",
                                                         fused_grad_in_forward)]
SLEEP_CYCLES_PER_SECOND = 2.5e9  # above any GPU clock: the sleep lasts at least as long as asked


def _device_time(call, n_calls):
    """(device seconds per call, host seconds per call, host-bound?) for ``n_calls`` of ``call``.

    A sleep kernel first occupies the stream for longer than queuing the calls takes (calibrated
    on an unmeasured pass), so that the GPU runs them back to back: the events then time the
    device work alone. ``host-bound`` reports that the sleep ran out before the last call was
    queued, in which case the device figure includes host gaps and must not be quoted.
    """
    call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_calls):
        call()
    host = (time.perf_counter() - t0) / n_calls
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(host * n_calls * 3 * SLEEP_CYCLES_PER_SECOND) + 1_000_000)
    start.record()
    t0 = time.perf_counter()
    for _ in range(n_calls):
        call()
    host = (time.perf_counter() - t0) / n_calls
    end.record()
    host_bound = start.query()  # the GPU already reached `start`: it waited for the host
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / n_calls, host, host_bound


def _record(row):
    path = os.environ.get("SPACEDKD_BENCH_KERNEL_JSON")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["forward", "both"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_kd_loss_cuda_device_time(shape, mode, capsys):
    if not HAS_CUDA:
        pytest.skip("needs CUDA")
    B, C = shape
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    s = (torch.randn(B, C, generator=gen) * 3).to("cuda", dtype).requires_grad_(mode == "both")
    t = (torch.randn(B, C, generator=gen) * 3).to("cuda", dtype)
    y = torch.randint(0, C, (B,), generator=gen).cuda()
    # Minimum traffic of the mode: read both logits; forward+backward also writes the gradient.
    passes = 2 if mode == "forward" else 3
    min_bytes = passes * B * C * s.element_size()
    src = torch.empty(min_bytes // 2 // s.element_size(), dtype=dtype, device="cuda").normal_()
    dst = torch.empty_like(src)
    n_calls = 10 if QUICK else 50

    copy_s, copy_host, copy_hb = _device_time(lambda: dst.copy_(src), n_calls)
    lines = [f"[kd_loss {mode} cuda bfloat16 {B}x{C}] device time (host excluded), "
             f"copy_ of the same {min_bytes / 1e6:.1f} MB: {copy_s * 1e3:.4f} ms = "
             f"{min_bytes / copy_s / 1e9:.0f} GB/s"]
    for name, fn in DEVICE_PROVIDERS:
        def call(fn=fn):
            if mode == "forward":
                with torch.no_grad():
                    fn(s, t, y)
            else:
                s.grad = None
                fn(s, t, y).backward()

        dev, host, host_bound = _device_time(call, n_calls)
        row = dict(provider=name, mode=mode, shape=[B, C], dtype="bfloat16",
                   device=torch.cuda.get_device_name(), device_ms=dev * 1e3,
                   host_us_per_call=host * 1e6, copy_ms=copy_s * 1e3,
                   fraction_of_copy=copy_s / dev, host_bound=host_bound)
        _record(row)
        flag = "  HOST-BOUND: device figure includes host gaps" if host_bound else ""
        lines.append(f"    {name:<26} device {dev * 1e3:9.4f} ms  {copy_s / dev:6.1%} of copy_  "
                     f"host {host * 1e6:8.1f} us/call{flag}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
