"""Runtime modes: channels_last, bfloat16 autocast on CPU, torch.compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spacedkd_fast.models import create


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _first(logits):
    return logits[-1] if isinstance(logits, list) else logits


@pytest.mark.parametrize(
    "name", ["resnet18", "byot_resnet18", "mobilenetv2", "shufflenetv2", "deit_tiny"]
)
def test_channels_last_gives_the_same_outputs(name):
    kw = {"downsample_factor": 4} if "resnet" in name else {}
    model = create(name, 5, **kw).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = _first(model(x)[1])
        model = model.to(memory_format=torch.channels_last)
        out = _first(model(x.contiguous(memory_format=torch.channels_last))[1])
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "byot_resnet18", "deit_tiny"])
def test_bfloat16_autocast_forward_backward(name):
    kw = {"downsample_factor": 4} if "resnet" in name else {}
    model = create(name, 5, **kw).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    ref = _first(model(x)[1]).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = _first(model(x)[1])
    assert logits.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: outputs agree to about 1e-2 relative to their scale
    scale = ref.abs().max()
    assert (logits.float() - ref).abs().max() <= 0.05 * scale + 1e-3
    nn.functional.cross_entropy(logits.float(), y).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["resnet18"])
def test_train_step_compiles_without_graph_breaks(name):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward (AOTAutograd)
    without code generation, which keeps this affordable on CPU (tracing alone takes ~10 s)."""
    torch._dynamo.reset()
    kw = {"downsample_factor": 16} if "resnet" in name else {}
    model = create(name, 5, **kw).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])

    def loss_of(m):
        _, logits = m(x)
        parts = logits if isinstance(logits, (list, tuple)) else [logits]
        return sum(nn.functional.cross_entropy(z, y) for z in parts)

    # BatchNorm updates running statistics in train mode: run both on copies of the same state
    eager_model = create(name, 5, **kw).train()
    eager_model.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss_of(compiled).backward()
    loss_of(eager_model).backward()
    for (n, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.slow  # inductor generates and compiles C++ kernels: ~30-40 s on 2 cores
def test_torch_compile_inductor_resnet18_matches_eager():
    torch._dynamo.reset()
    model = create("resnet18", 5, downsample_factor=16).eval()
    compiled = torch.compile(model)  # default backend: inductor
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features, logits = compiled(x)
        ref_features, ref_logits = model(x)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features, ref_features, rtol=1e-4, atol=1e-4)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", ["resnet18", "byot_resnet18", "deit_tiny_distilled", "pvt_v2_b0"])
def test_cuda_outputs_match_cpu_and_bf16_channels_last_trains(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    kw = {"downsample_factor": 4} if "resnet" in name else {}
    model = create(name, 5, **kw).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = _first(model(x)[1])
        on_gpu = _first(model.cuda()(x.cuda())[1]).cpu()
    torch.testing.assert_close(on_gpu, reference, rtol=1e-3, atol=1e-3)
    model = model.to(memory_format=torch.channels_last).train()
    x = x.cuda().contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, logits = model(x)
    extra = getattr(model, "distill_logits", None)  # the distillation head of a distilled ViT
    parts = [logits] + ([extra] if extra is not None else [])
    sum(z.float().logsumexp(1).mean() for z in parts).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.cuda
@cuda
def test_cuda_inductor_resnet18_train_step_matches_eager():
    torch._dynamo.reset()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = create("resnet18", 5).cuda().train()
    eager = create("resnet18", 5).cuda().train()
    eager.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    nn.functional.cross_entropy(torch.compile(model)(x)[1], y).backward()
    nn.functional.cross_entropy(eager(x)[1], y).backward()
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=n)
