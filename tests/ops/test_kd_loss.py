"""The fused KD loss against the float64 reference of SPEC section 2, on CPU and (marked) CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close_worst

import spacedkd_fast as sk
from spacedkd_fast import ops
from spacedkd_fast.ops.reference import kd_loss_eager, kd_loss_float64

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float64]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) per dtype; for gradients atol is relative to the largest reference gradient.
LOSS_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 2e-6),
            torch.bfloat16: (1e-5, 2e-6), torch.float16: (1e-5, 2e-6)}
GRAD_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-6, 2e-5),
            torch.bfloat16: (8e-3, 8e-3), torch.float16: (1e-3, 1e-3)}
SHAPES = [(1, 1), (41, 1271), (128, 100), (256, 1000), (64, 40000), (7, 3)]

cuda = pytest.mark.cuda


def device_dtype_cases():
    cases = [pytest.param("cpu", dt, id=f"cpu-{str(dt)[6:]}") for dt in CPU_DTYPES]
    cases += [pytest.param("cuda", dt, id=f"cuda-{str(dt)[6:]}", marks=cuda) for dt in CUDA_DTYPES]
    return cases


def make_inputs(shape, dtype, device, scale=3.0, ignore_every=0):
    B, C = shape
    s = (torch.randn(B, C, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    t = (torch.randn(B, C, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    y = torch.randint(0, C, (B,), device=device)
    if ignore_every:
        y[::ignore_every] = -100
    return s, t, y


def check_against_reference(s, t, y, *, temperature, alpha, kd_scale=None, reduction="mean",
                            grad_weight=None, ignore_index=-100):
    """Loss and gradient of sk.kd_loss vs the float64 reference on the same (rounded) inputs."""
    dtype = s.dtype
    s_k = s.detach().clone().requires_grad_(True)
    loss = sk.kd_loss(s_k, t, y, temperature=temperature, alpha=alpha, kd_scale=kd_scale,
                      reduction=reduction, ignore_index=ignore_index)
    s_r = s.detach().double().requires_grad_(True)
    ref = kd_loss_float64(s_r, t, y, temperature=temperature, alpha=alpha, kd_scale=kd_scale,
                          reduction=reduction, ignore_index=ignore_index)
    atol, rtol = LOSS_TOL[dtype]
    assert_close_worst(loss, ref, atol=atol, rtol=rtol, what=f"loss {dtype}")
    weight = grad_weight if grad_weight is not None else torch.ones_like(ref)
    (loss * weight.to(loss.dtype).to(loss.device)).sum().backward()
    (ref * weight.double().to(ref.device)).sum().backward()
    scale = max(s_r.grad.abs().max().item(), 1e-30)
    atol, rtol = GRAD_TOL[dtype]
    assert s_k.grad.dtype == dtype
    assert_close_worst(s_k.grad, s_r.grad, atol=atol * scale, rtol=rtol, what=f"grad {dtype}")
    return loss, s_k.grad


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64_reference(device, dtype, shape):
    s, t, y = make_inputs(shape, dtype, device)
    check_against_reference(s, t, y, temperature=3.0, alpha=0.3)


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
@pytest.mark.parametrize("temperature,alpha,kd_scale", [(1.0, 0.0, None), (0.5, 1.0, None),
                                                        (4.0, 0.5, 1.0), (2.0, 0.9, 0.25)])
def test_hyperparameters(device, dtype, temperature, alpha, kd_scale):
    s, t, y = make_inputs((33, 257), dtype, device)
    check_against_reference(s, t, y, temperature=temperature, alpha=alpha, kd_scale=kd_scale)


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_ignore_index_and_grad_output(device, dtype, reduction):
    s, t, y = make_inputs((50, 130), dtype, device, ignore_every=4)
    weight = None
    if reduction == "none":
        weight = torch.rand(50, dtype=torch.float64) * 3 - 1  # grad_output != 1, signs mixed
    else:
        weight = torch.tensor(2.5, dtype=torch.float64)
    loss, grad = check_against_reference(s, t, y, temperature=2.0, alpha=0.4,
                                         reduction=reduction, grad_weight=weight)
    ignored = y == -100
    assert grad[ignored].abs().max().item() == 0.0
    if reduction == "none":
        assert loss[ignored].abs().max().item() == 0.0


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
def test_extreme_logits(device, dtype):
    """Logits of +-1e4. There one ulp of float32 is ~1e-3, so no float32 computation of
    softmax(s) is accurate to 1e-5; the criterion is flash-attention's: the kernel's error is at
    most twice that of plain PyTorch in float32 on the same inputs."""
    B, C = 16, 300
    sign_s = torch.randint(0, 2, (B, C)) * 2 - 1
    sign_t = torch.randint(0, 2, (B, C)) * 2 - 1
    s = (sign_s * 1e4).double()
    t = (sign_t * 1e4).double()
    s[:, :5] = torch.randn(B, 5, dtype=torch.float64) * 1e4
    s, t = s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)
    y = torch.randint(0, C, (B,), device=device)
    s_k = s.clone().requires_grad_(True)
    loss = sk.kd_loss(s_k, t, y, temperature=1.0, alpha=0.5)
    loss.backward()
    s_e = s.detach().float().clone().requires_grad_(True)
    eager = kd_loss_eager(s_e, t.float(), y, temperature=1.0, alpha=0.5)
    eager.backward()
    s_r = s.detach().double().requires_grad_(True)
    ref = kd_loss_float64(s_r, t, y, temperature=1.0, alpha=0.5)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_k.grad).all()
    loss_err = abs(loss.item() - ref.item())
    assert loss_err <= 2 * abs(eager.item() - ref.item()) + 1e-6 * abs(ref.item())
    grad_err = (s_k.grad.double() - s_r.grad).abs().max().item()
    eager_grad_err = (s_e.grad.double() - s_r.grad).abs().max().item()
    floor = GRAD_TOL[dtype][0] * s_r.grad.abs().max().item()
    assert grad_err <= 2 * eager_grad_err + floor, (grad_err, eager_grad_err)


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
def test_non_contiguous_inputs(device, dtype):
    base_s, base_t, _ = make_inputs((64, 200), dtype, device)
    s = base_s[:, ::2]  # strided rows
    t = base_t.t().contiguous().t()[:, 1::2]  # column-major storage, then strided
    y = torch.randint(0, 100, (64,), device=device)
    assert not s.is_contiguous() and not t.is_contiguous()
    check_against_reference(s, t, y, temperature=3.0, alpha=0.3)


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
def test_empty_batch_and_all_rows_ignored(device, dtype):
    for shape, ignore_all in (((0, 10), False), ((12, 10), True)):
        s, t, y = make_inputs(shape, dtype, device)
        if ignore_all:
            y.fill_(-100)
        s.requires_grad_(True)
        for reduction in ("mean", "sum"):
            loss, ce, kl = sk.kd_loss(s, t, y, temperature=2.0, alpha=0.5, reduction=reduction,
                                      return_parts=True)
            assert loss.item() == 0.0 and ce.item() == 0.0 and kl.item() == 0.0
            (grad,) = torch.autograd.grad(loss, s)
            assert grad.shape == s.shape and (grad == 0).all()


@pytest.mark.parametrize("device,dtype", device_dtype_cases())
def test_parts_match_reference(device, dtype):
    s, t, y = make_inputs((40, 90), dtype, device, ignore_every=5)
    T = 3.0
    loss, ce, kl = sk.kd_loss(s, t, y, temperature=T, alpha=0.3, return_parts=True)
    valid = y != -100
    sd, td = s.double()[valid], t.double()[valid]
    ce_ref = F.cross_entropy(sd, y[valid])
    kl_ref = F.kl_div(F.log_softmax(sd / T, 1), F.log_softmax(td / T, 1), log_target=True,
                      reduction="batchmean")
    assert_close_worst(ce, ce_ref, atol=1e-5, rtol=1e-5, what="ce part")
    assert_close_worst(kl, kl_ref, atol=1e-5, rtol=1e-5, what="kl part")
    assert not ce.requires_grad and not kl.requires_grad


def test_second_backward_through_retained_graph():
    """The CPU path hands its saved gradient to autograd (no extra pass over [B, C]). Through a
    retained graph a second backward accumulates correctly; if .grad was modified in place in
    between, autograd's version check raises instead of returning a wrong gradient."""
    s, t, y = make_inputs((8, 20), torch.float32, "cpu")
    s.requires_grad_(True)
    loss = sk.kd_loss(s, t, y, temperature=2.0)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.allclose(s.grad, 2 * first)
    s.grad.zero_()  # in place, as optimizer.zero_grad(set_to_none=False) does
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_teacher_gets_no_gradient():
    s, t, y = make_inputs((8, 20), torch.float32, "cpu")
    s.requires_grad_(True)
    t.requires_grad_(True)
    sk.kd_loss(s, t, y, temperature=2.0).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("write_grad", [True, False], ids=["grad-in-forward", "backward-kernel"])
def test_both_gradient_paths_agree_with_reference(write_grad):
    """The two ways the op produces the gradient (kd_op.py docstring), each through autograd."""
    s, t, y = make_inputs((37, 515), torch.float32, "cpu", ignore_every=6)
    s.requires_grad_(True)
    row_loss, *_ = ops.kd_loss_forward(s, t, y, 2.0, 0.3, 4.0, -100, "none", write_grad)
    weight = torch.randn(37)
    (grad,) = torch.autograd.grad((row_loss * weight).sum(), s)
    s_r = s.detach().double().requires_grad_(True)
    ref = kd_loss_float64(s_r, t, y, temperature=2.0, alpha=0.3, kd_scale=4.0, reduction="none")
    (ref_grad,) = torch.autograd.grad((ref * weight.double()).sum(), s_r)
    scale = ref_grad.abs().max().item()
    assert_close_worst(grad, ref_grad, atol=2e-6 * scale, rtol=2e-5, what=f"write_grad={write_grad}")


def test_module_equals_function():
    s, t, y = make_inputs((20, 30), torch.float32, "cpu")
    module = sk.KDLoss(temperature=3.0, alpha=0.3, kd_scale=1.0)
    expected = sk.kd_loss(s, t, y, temperature=3.0, alpha=0.3, kd_scale=1.0)
    assert torch.equal(module(s, t, y), expected)
    assert "temperature=3.0" in repr(module)


def test_bf16_error_within_twice_eager_bf16_error():
    """flash-attention's criterion: the kernel at bf16 is no worse than plain PyTorch at bf16."""
    s, t, y = make_inputs((256, 1000), torch.bfloat16, "cpu")
    ref = kd_loss_float64(s, t, y, temperature=3.0, alpha=0.3).item()
    ours = sk.kd_loss(s, t, y, temperature=3.0, alpha=0.3).item()
    eager = kd_loss_eager(s, t, y, temperature=3.0, alpha=0.3).float().item()
    assert abs(ours - ref) <= 2 * abs(eager - ref) + 1e-6


def test_gradcheck_float64():
    for write_grad in (True, False):
        s, t, y = make_inputs((4, 7), torch.float64, "cpu")
        y[1] = -100
        s.requires_grad_(True)

        for reduction in ("none", "mean", "sum"):
            def loss(x, t=t, y=y, write_grad=write_grad, reduction=reduction):
                return ops.kd_loss_forward(x, t, y, 1.7, 0.35, 2.0, -100, reduction, write_grad)[0]

            assert torch.autograd.gradcheck(loss, (s,), eps=1e-6, atol=1e-8)
        assert torch.autograd.gradcheck(
            lambda x, t=t, y=y: sk.kd_loss(x, t, y, temperature=0.8, alpha=0.6), (s,), eps=1e-6,
            atol=1e-8)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_opcheck(device):
    dtypes = [torch.float32, torch.float64] if device == "cpu" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        for write_grad in (True, False):
            for reduction in ops.REDUCTIONS.values():
                s, t, y = make_inputs((6, 11), dtype, device, ignore_every=4)
                s.requires_grad_(True)
                torch.library.opcheck(torch.ops.spacedkd.kd_loss_forward,
                                      (s, t, y, 2.0, 0.3, 4.0, -100, reduction, write_grad))
        for reduction, code in ops.REDUCTIONS.items():
            s, t, y = make_inputs((6, 11), dtype, device, ignore_every=4)
            _, stats, _, count, _ = ops.kd_loss_forward(s, t, y, 2.0, 0.3, 4.0, -100, reduction)
            shape = (6,) if reduction == "none" else ()
            grad_loss = torch.rand(shape, dtype=stats.dtype, device=device)
            torch.library.opcheck(torch.ops.spacedkd.kd_loss_backward,
                                  (grad_loss, s, t, y, stats, count, 2.0, 0.3, 4.0, -100, code))


def test_torch_compile_fullgraph():
    s, t, y = make_inputs((32, 50), torch.float32, "cpu", ignore_every=7)

    def step(student, teacher, target):
        return sk.kd_loss(student, teacher, target, temperature=3.0, alpha=0.3) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    out_c = compiled(s1, t, y)
    out_e = step(s2, t, y)
    out_c.backward()
    out_e.backward()
    assert torch.allclose(out_c, out_e, atol=1e-6)
    assert torch.allclose(s1.grad, s2.grad, atol=1e-7)


def test_cuda_kernel_registered_when_compiled():
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "spacedkd::kd_loss_forward", "CUDA")
    has_cuda_bwd = torch._C._dispatch_has_kernel_for_dispatch_key(
        "spacedkd::kd_loss_backward", "CUDA")
    assert ops.cuda_compiled() == has_cuda_kernel == has_cuda_bwd
    assert torch._C._dispatch_has_kernel_for_dispatch_key("spacedkd::kd_loss_forward", "CPU")
    if torch.version.cuda and not HAS_CUDA:
        # CI builds with a CUDA torch: the CUDA kernels must have been compiled and linked.
        assert ops.cuda_compiled(), "torch has CUDA but the CUDA kernels were not compiled"


@cuda
def test_cuda_out_of_range_target_gives_nan_row():
    s, t, y = make_inputs((4, 10), torch.float32, "cuda")
    y[2] = 10
    rows = sk.kd_loss(s, t, y, reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()


@cuda
@pytest.mark.parametrize("C", [31, 1024, 1025, 16384, 16385, 40000], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("write_grad", [False, True], ids=["backward-kernel", "grad-in-forward"])
def test_cuda_row_layouts_loss_vs_cpu_and_gradient_vs_float64(C, write_grad):
    """Each CUDA row layout (a warp per row up to C = 1024, a block of 256 / 512 threads per row
    above; scalar loads where rows are not 16-byte aligned: C = 31, 1025, 16385), through both
    gradient paths: per-row losses against the CPU kernel, the gradient of a weighted sum of
    them against the float64 reference."""
    s, t, y = make_inputs((9, C), torch.float32, "cpu", ignore_every=4)
    weight = torch.rand(9, dtype=torch.float64) * 2 - 0.5
    cpu_rows = ops.kd_loss_forward(s, t, y, 2.0, 0.4, 4.0, -100, "none")[0]
    s_k = s.cuda().requires_grad_(True)
    rows = ops.kd_loss_forward(s_k, t.cuda(), y.cuda(), 2.0, 0.4, 4.0, -100, "none",
                               write_grad)[0]
    assert_close_worst(rows, cpu_rows, atol=1e-4, rtol=1e-5, what=f"loss C={C}")
    (rows * weight.float().cuda()).sum().backward()
    s_r = s.double().requires_grad_(True)
    ref = kd_loss_float64(s_r, t, y, temperature=2.0, alpha=0.4, kd_scale=4.0, reduction="none")
    (ref * weight).sum().backward()
    atol, rtol = GRAD_TOL[torch.float32]
    assert_close_worst(s_k.grad, s_r.grad, atol=atol * s_r.grad.abs().max().item(), rtol=rtol,
                       what=f"grad C={C} write_grad={write_grad}")


def test_paper_code_objective_matches_its_formula():
    s, t, y = make_inputs((10, 6), torch.float64, "cpu")
    T, alpha = 3.0, 0.3
    p = torch.softmax(s / T, 1)
    q = torch.softmax(t / T, 1)
    term = (q * (q.log() - p)).sum() / 10  # probabilities where log-probabilities belong
    expected = (1 - alpha) * F.cross_entropy(s, y) + alpha * term
    got = sk.paper_code_kd_loss(s, t, y, temperature=T, alpha=alpha)
    assert_close_worst(got, expected, atol=1e-12, rtol=1e-12, what="paper-code")
    # Not a divergence: its value with student == teacher is not its minimum.
    onehot = torch.full_like(t, -30.0).scatter(1, t.argmax(1, keepdim=True), 30.0)
    assert sk.paper_code_kd_loss(onehot, t, y, temperature=T, alpha=1.0) < \
        sk.paper_code_kd_loss(t, t, y, temperature=T, alpha=1.0)


def test_feature_losses():
    a, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    assert torch.allclose(sk.feature_loss(a, b), ((a - b) ** 2).sum().sqrt())
    assert torch.allclose(sk.feature_loss(a, b, "l1"), (a - b).abs().mean())
    assert torch.allclose(sk.feature_loss(a, b, "l2"), ((a - b) ** 2).mean())
    with pytest.raises(ValueError, match="kind must be one of"):
        sk.feature_loss(a, b, "cosine")
    with pytest.raises(ValueError, match="same shape"):
        sk.feature_loss(a, b[:, :3])
