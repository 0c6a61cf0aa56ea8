"""How flat is a minimum: Hutchinson's estimate of the Hessian trace, and a 1-D loss profile.

The paper explains Spaced KD's gain by flatter minima, measured by the trace of the Hessian of the
loss with respect to the weights (smaller = flatter). ``hessian_trace`` estimates it as
``mean_i v_i^T H v_i`` over Rademacher probes ``v_i`` (entries +-1, so ``E[v v^T] = I``); each
``H v`` is a Hessian-vector product by double backward, never the Hessian itself. The standard error
is the probes' standard deviation over ``sqrt(samples)``: every probe sees all the batches given,
so the only noise is the probes'.

``loss_profile`` evaluates the loss and accuracy at ``theta + alpha * d`` along one random
direction ``d`` normalised filter by filter to the weights' norms (Li et al., "Visualizing the Loss
Landscape of Neural Nets", 2018), which makes profiles of different networks comparable.

Both put the model in eval mode (BatchNorm uses its running statistics, dropout is off) and restore
its mode and weights afterwards. A model may return logits, ``(features, logits)``, or
``(features, [logits of each exit])`` (multi-exit self-KD networks: the deepest, last exit counts).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["TraceEstimate", "hessian_trace", "loss_profile", "filter_normalized_direction"]

Progress = Callable[[str], None]


@dataclass
class TraceEstimate:
    """Hutchinson estimate of ``tr(H)`` of the mean cross-entropy over the batches given.

    ``trace``: the estimate; ``stderr``: its standard error (probes' std / sqrt(samples));
    ``samples``: number of probes; ``per_probe``: each ``v^T H v``; ``num_samples``: data points
    the loss averaged over; ``num_params``: entries of the parameters the Hessian is taken over.
    """

    trace: float
    stderr: float
    samples: int
    num_samples: int
    num_params: int
    per_probe: list[float] = field(repr=False)

    def as_dict(self) -> dict:
        return asdict(self)


def _logits(output) -> Tensor:
    """Logits ``[B, C]`` of a model output: the tensor itself, the last element of
    ``(features, logits)``, and of a list of exits' logits the deepest (last)."""
    for _ in range(2):
        if isinstance(output, (tuple, list)):
            output = output[-1]
    return output


def _upcast(logits: Tensor) -> Tensor:
    """Half-precision logits in float32; float32 and float64 as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _math_attention():
    """Double backward through attention needs the plain (math) SDPA kernel on CUDA."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to select
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _rademacher(params: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    return [torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype)
            .mul_(2).sub_(1) for p in params]


def hessian_trace(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                  samples: int = 64, seed: int = 0, progress: Progress | None = None
                  ) -> TraceEstimate:
    """Hutchinson estimate of the trace of the Hessian of the mean cross-entropy w.r.t. the weights.

    Args:
        model: any module returning logits ``[B, C]`` (or the tuples described in the module
            docstring); its parameters with ``requires_grad`` are the Hessian's variables. It runs
            on its own device; batches are moved there.
        batches: ``(x, y)`` pairs; the loss is the mean over all their rows (each batch weighted by
            its size). Iterated once: for each batch the gradient graph is built once and every
            probe's ``H v`` is taken from it.
        samples: number of Rademacher probes (>= 2, for a standard error).
        seed: the probes are drawn from a generator seeded with ``seed`` on the model's device, so
            the estimate is reproducible on one device type (CPU and CUDA draw different probes).
        progress: called with a short text after each batch.

    Returns:
        ``TraceEstimate`` (trace, stderr, per-probe values, ...). Float64 accumulation.
    """
    if samples < 2:
        raise ValueError(f"samples must be >= 2 for a standard error, got {samples}")
    device = _model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require a gradient")
    sums = torch.zeros(samples, dtype=torch.float64)
    total = 0
    generator = torch.Generator(device=device)
    t0 = time.monotonic()
    with _eval_mode(model), _math_attention():
        for b, (x, y) in enumerate(batches):
            x, y = x.to(device), y.to(device)
            n = int(y.shape[0])
            if n == 0:
                continue
            loss = nn.functional.cross_entropy(_upcast(_logits(model(x))), y, reduction="sum")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # a gradient that does not depend on the weights (or a weight the loss does not use)
            # has zero Hessian rows
            keep = [g is not None and g.requires_grad for g in grads]
            used_grads = [g for g, k in zip(grads, keep) if k]
            values = torch.zeros(samples, dtype=torch.float64, device=device)
            for i in range(samples):
                # the same probe i for every batch: sum_b v^T H_b v = v^T H v
                generator.manual_seed(seed * 1_000_003 + i)
                probe = _rademacher(params, generator)
                if not used_grads:
                    continue
                probe_used = [v for v, k in zip(probe, keep) if k]
                hv = torch.autograd.grad(used_grads, params, grad_outputs=probe_used,
                                         retain_graph=i < samples - 1, allow_unused=True)
                values[i] = sum((h * v).sum(dtype=torch.float64) for h, v in zip(hv, probe)
                                if h is not None)
            sums += values.cpu()
            total += n
            del loss, grads, used_grads
            if progress is not None:
                progress(f"batch {b + 1}: {total} samples, {samples} probes, "
                         f"{time.monotonic() - t0:.1f} s")
    if total == 0:
        raise ValueError("the batches held no samples")
    per_probe = (sums / total).tolist()
    mean = math.fsum(per_probe) / samples
    var = math.fsum((v - mean) ** 2 for v in per_probe) / (samples - 1)
    return TraceEstimate(trace=mean, stderr=math.sqrt(var / samples), samples=samples,
                         num_samples=total, num_params=sum(p.numel() for p in params),
                         per_probe=per_probe)


def filter_normalized_direction(model: nn.Module, *, seed: int = 0) -> list[Tensor]:
    """A Gaussian direction in weight space, one tensor per parameter, rescaled filter by filter.

    Each filter (slice along the first dimension) of a parameter with two or more dimensions gets
    the norm of the corresponding weight filter; one-dimensional parameters (biases, normalisation
    scales) get a zero direction, as in Li et al. (2018).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        if p.dim() <= 1:
            d.zero_()
        else:
            w = p.detach().reshape(p.shape[0], -1)
            dv = d.reshape(p.shape[0], -1)
            dv.mul_(w.norm(dim=1, keepdim=True) / (dv.norm(dim=1, keepdim=True) + 1e-10))
        out.append(d)
    return out


@torch.no_grad()
def loss_profile(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                 alphas: Iterable[float] | None = None, seed: int = 0,
                 progress: Progress | None = None) -> dict[str, list[float]]:
    """Mean cross-entropy and top-1 at ``theta + alpha * d`` for each ``alpha`` (``d``: see
    ``filter_normalized_direction``). ``batches`` is iterated once per ``alpha`` (give a list).

    Returns ``{"alpha": [...], "loss": [...], "top1": [...]}`` (top-1 as a fraction). The weights
    are restored afterwards, also on error.
    """
    alphas = [float(a) for a in (alphas if alphas is not None else
                                 [i / 10 for i in range(-10, 11)])]
    batches = list(batches)
    device = _model_device(model)
    params = list(model.parameters())
    direction = filter_normalized_direction(model, seed=seed)
    original = [p.detach().clone() for p in params]
    result: dict[str, list[float]] = {"alpha": alphas, "loss": [], "top1": []}
    t0 = time.monotonic()
    try:
        with _eval_mode(model):
            for k, alpha in enumerate(alphas):
                for p, p0, d in zip(params, original, direction):
                    p.copy_(p0 + alpha * d)
                loss_sum, correct, total = 0.0, 0, 0
                for x, y in batches:
                    x, y = x.to(device), y.to(device)
                    logits = _upcast(_logits(model(x)))
                    loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == y).sum())
                    total += int(y.shape[0])
                result["loss"].append(loss_sum / max(total, 1))
                result["top1"].append(correct / max(total, 1))
                if progress is not None:
                    progress(f"alpha {alpha:+.2f} ({k + 1}/{len(alphas)}): loss "
                             f"{result['loss'][-1]:.4f}, top-1 {100 * result['top1'][-1]:.2f}%, "
                             f"{time.monotonic() - t0:.1f} s")
    finally:
        for p, p0 in zip(params, original):
            p.copy_(p0)
    return result
