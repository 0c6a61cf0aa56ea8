"""Forward+backward throughput of the CIFAR ResNet-18 (32x32, 100 classes), one training step.

Providers: float32 / bfloat16 autocast x contiguous / channels_last x eager / torch.compile; the
baseline is eager float32 contiguous. Images per second = batch / median time (``batch`` is stored in
the extra info). On CPU the compiled providers are skipped with ``SPACEDKD_BENCH_QUICK=1`` unless
``SPACEDKD_BENCH_CPU_COMPILE=1``: inductor needs minutes per configuration there (forward and
backward C++ kernels), which does not fit the CI budget.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from spacedkd_fast.models import create

QUICK = os.environ.get("SPACEDKD_BENCH_QUICK", "0") not in ("", "0")
CPU_COMPILE = not QUICK or os.environ.get("SPACEDKD_BENCH_CPU_COMPILE", "0") not in ("", "0")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH = {"cpu": 8 if QUICK else 32, "cuda": 256}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resnet18_train_step(bench, device, compiled, channels_last, dtype):
    if compiled and device == "cpu" and not CPU_COMPILE:
        pytest.skip(
            "inductor compiles a training step in minutes on CPU; SPACEDKD_BENCH_CPU_COMPILE=1"
        )
    torch.manual_seed(0)
    batch = BATCH[device]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = create("resnet18", 100, image_size=32).to(device, memory_format=memory_format).train()
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 100, (batch,), device=device)
    forward = torch.compile(model) if compiled else model
    autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None

    def step():
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            _, logits = forward(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)

    step()  # compile (if any) and allocate outside the timed rounds
    provider = f"{'compiled' if compiled else 'eager'}-{dtype}-{'cl' if channels_last else 'nchw'}"
    bench(
        step,
        warmup=0 if QUICK else 1,
        group=f"resnet18 fwd+bwd 32px batch {batch} ({device})",
        provider=provider,
        baseline=not compiled and not channels_last and dtype == "float32",
        device=device,
        batch=batch,
        dtype=dtype,
        channels_last=channels_last,
        compiled=compiled,
    )
