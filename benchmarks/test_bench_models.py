"""Forward+backward throughput of one training step (100 classes).

CIFAR ResNet-18 (32x32):

Providers: float32 / bfloat16 autocast x contiguous / channels_last x eager / torch.compile; the
baseline is eager float32 contiguous. Images per second = batch / median time (``batch`` is stored in
the extra info). On CPU the compiled providers are skipped with ``SPACEDKD_BENCH_QUICK=1`` unless
``SPACEDKD_BENCH_CPU_COMPILE=1``: inductor needs minutes per configuration there (forward and
backward C++ kernels), which does not fit the CI budget.

The official ViT-code models written in this package (PVT-Tiny, T2T-ViT-7/14, CvT-13 at 224 px,
ResNet-56 at its official 32 px): eager against ``torch.compile`` (inductor), float32, the same
skipping rule for compiled CPU providers. Batch 1 on CPU in quick mode (a 224 px step takes seconds
on two cores), 8 in full mode, 64 on CUDA.
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


def skip_slow_cpu_compile(compiled: bool, device: str) -> None:
    if compiled and device == "cpu" and not CPU_COMPILE:
        pytest.skip(
            "inductor compiles a training step in minutes on CPU; SPACEDKD_BENCH_CPU_COMPILE=1"
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resnet18_train_step(bench, device, compiled, channels_last, dtype):
    skip_slow_cpu_compile(compiled, device)
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


OFFICIAL_MODELS = [("pvt_tiny", 224), ("t2t_vit_7", 224), ("t2t_vit_14", 224), ("cvt_13", 224),
                   ("resnet56", 32)]  # fmt: skip
OFFICIAL_BATCH = {"cpu": 1 if QUICK else 8, "cuda": 64}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name, size", OFFICIAL_MODELS, ids=[n for n, _ in OFFICIAL_MODELS])
def test_official_vit_models_train_step(bench, name, size, compiled, device):
    skip_slow_cpu_compile(compiled, device)
    torch.manual_seed(0)
    batch = OFFICIAL_BATCH[device]
    model = create(name, 100, image_size=size).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    forward = torch.compile(model) if compiled else model

    def step():
        _, logits = forward(x)
        nn.functional.cross_entropy(logits, y).backward()
        model.zero_grad(set_to_none=True)
        _sync(device)

    step()  # compile (if any) and allocate outside the timed rounds
    bench(
        step,
        warmup=0 if QUICK else 1,
        group=f"{name} fwd+bwd {size}px batch {batch} ({device})",
        provider="compiled" if compiled else "eager",
        baseline=not compiled,
        device=device,
        batch=batch,
        image_size=size,
        compiled=compiled,
    )
