"""Typed wrappers over ``torch.ops.spacedkd`` with their fake kernels and autograd.

Importing this module loads the compiled extension (which registers the ops with the
dispatcher) and registers, from Python:
- fake kernels, so that ``torch.compile`` traces the ops without running them;
- autograd: the gradient w.r.t. the student logits; the teacher logits and the target get none.

Two ways to produce the gradient, chosen per device (see benchmarks/test_bench_kd_loss.py for
the measurement behind the choice):
- CPU: the forward writes ``d row_loss / d student`` while the row is still in cache, and the
  backward only scales it by the incoming row gradient.
- CUDA: the forward saves the row maxima and log-sums; the backward kernel recomputes the
  softmaxes from the logits. Forward-only calls (evaluation, logging) then cost two reads of
  [B, C] instead of three, and nothing of size [B, C] is held between forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from spacedkd_fast import _C
except ImportError as exc:  # pragma: no cover - depends on the installation
    from pathlib import Path

    _package_dir = Path(__file__).resolve().parent
    if (_package_dir.parent / "setup.py").exists() and not list(_package_dir.glob("_C*.so")):
        _hint = (
            f"Python is importing the source checkout {_package_dir}, which has no compiled "
            "extension. Install it in editable mode (`pip install --no-build-isolation -e .`), "
            "or build in place (`python setup.py build_ext --inplace`), or run from outside the "
            "checkout to use an installed copy."
        )
    else:
        _hint = (
            "Install the package with `pip install --no-build-isolation .` into an environment "
            "that already has the torch you run with (README, Installation)."
        )
    raise ImportError(
        f"spacedkd_fast's compiled extension (spacedkd_fast._C) could not be loaded: {exc}. "
        + _hint
    ) from exc

_INFO = _C.build_info()
if _INFO["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:  # pragma: no cover
    raise ImportError(
        f"spacedkd_fast._C was built against torch {_INFO['torch_version']} but torch "
        f"{torch.__version__} is running; rebuild with `pip install --no-build-isolation .`"
    )

ROW_STATS = ("max_student", "max_teacher", "log_z_student", "log_z_student_T",
             "log_z_teacher_T", "ce", "kl")
"""Columns of the ``row_stats`` output of :func:`kd_loss_forward`."""
ROW_CE = ROW_STATS.index("ce")
ROW_KL = ROW_STATS.index("kl")


def build_info() -> dict:
    """How the extension was built: version, torch version, CUDA compiled or not, arch list."""
    return dict(_INFO)


def cuda_compiled() -> bool:
    """True when the CUDA kernels of the ops were compiled into this build."""
    return bool(_INFO["cuda"])


REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
"""Codes of the ``reduction`` argument of the op."""


def kd_loss_forward(
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    temperature: float,
    alpha: float,
    kd_scale: float,
    ignore_index: int = -100,
    reduction: str = "none",
    write_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused KD loss, one kernel call.

    Args:
        student, teacher: logits ``[B, C]`` of one floating dtype.
        target: int64 class indices ``[B]``; rows equal to ``ignore_index`` contribute nothing.
        reduction: ``"none"``, ``"mean"`` (over non-ignored rows) or ``"sum"``.
        write_grad: also write ``d loss / d student`` (for ``"none"``: of each row's loss).
    Returns:
        ``loss`` (``[B]`` or ``[]``), ``row_stats [B, 7]`` (columns :data:`ROW_STATS`) and
        ``count`` (``[]``, non-ignored rows) in the accumulation dtype (float32; float64 for
        float64 logits), and the gradient ``[B, C]`` in the logits dtype (empty unless
        ``write_grad``), returned as ``(loss, row_stats, grad, count)``.
    """
    return torch.ops.spacedkd.kd_loss_forward(
        student, teacher, target, float(temperature), float(alpha), float(kd_scale),
        int(ignore_index), REDUCTIONS[reduction], bool(write_grad),
    )


def kd_loss_backward(
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    target: Tensor,
    row_stats: Tensor,
    count: Tensor,
    temperature: float,
    alpha: float,
    kd_scale: float,
    ignore_index: int = -100,
    reduction: str = "none",
) -> Tensor:
    """Gradient of :func:`kd_loss_forward`'s loss w.r.t. the student logits, ``[B, C]``.

    ``grad_loss`` is the gradient of that loss (``[B]`` for ``"none"``, a scalar otherwise);
    ``row_stats`` and ``count`` are the forward's outputs.
    """
    return torch.ops.spacedkd.kd_loss_backward(
        grad_loss, student, teacher, target, row_stats, count, float(temperature), float(alpha),
        float(kd_scale), int(ignore_index), REDUCTIONS[reduction],
    )


def _accumulate_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.register_fake("spacedkd::kd_loss_forward")
def _kd_loss_forward_fake(student, teacher, target, temperature, alpha, kd_scale, ignore_index,
                          reduction, write_grad):
    torch._check(student.dim() == 2, lambda: "kd_loss: student logits must be 2-D [B, C]")
    torch._check(student.shape == teacher.shape,
                 lambda: "kd_loss: student and teacher logits must have the same shape [B, C]")
    rows, cols = student.shape
    acc = _accumulate_dtype(student)
    loss = student.new_empty((rows,) if reduction == REDUCTIONS["none"] else (), dtype=acc)
    row_stats = student.new_empty((rows, len(ROW_STATS)), dtype=acc)
    grad = student.new_empty((rows, cols) if write_grad else (0, 0))
    count = student.new_empty((), dtype=acc)
    return loss, row_stats, grad, count


@torch.library.register_fake("spacedkd::kd_loss_backward")
def _kd_loss_backward_fake(grad_loss, student, teacher, target, row_stats, count, temperature,
                           alpha, kd_scale, ignore_index, reduction):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


_NO_GRAD_FOR_THE_REST = (None,) * 8


def _is_eager_cpu(t: Tensor) -> bool:
    """A real CPU tensor outside any tracing (compile, fake or proxy modes): its value can be read."""
    return (
        t.device.type == "cpu"
        and type(t) is torch.Tensor
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch.compiler.is_compiling()
    )


def _setup_context(ctx, inputs, output):
    (student, teacher, target, temperature, alpha, kd_scale, ignore_index, reduction,
     write_grad) = inputs
    _, row_stats, grad, count = output
    ctx.write_grad = write_grad
    ctx.reduction = reduction
    ctx.grad_handed_out = False
    ctx.args = (temperature, alpha, kd_scale, ignore_index)
    if write_grad:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(student, teacher, target, row_stats, count)


def _backward(ctx, grad_loss, _grad_row_stats, _grad_grad, _grad_count):
    if ctx.write_grad:
        (grad,) = ctx.saved_tensors
        if grad_loss is None:
            return (torch.zeros_like(grad),) + _NO_GRAD_FOR_THE_REST
        if ctx.reduction == REDUCTIONS["none"]:
            return ((grad * grad_loss.unsqueeze(1)).to(grad.dtype),) + _NO_GRAD_FOR_THE_REST
        # grad already is d loss / d student. For the usual loss.backward() (grad_output 1)
        # hand it out as it is: reading one CPU scalar costs nothing, a multiply costs a pass
        # over [B, C]. (Not while tracing: there the value is unknown.)
        if not ctx.grad_handed_out and _is_eager_cpu(grad_loss) and grad_loss.item() == 1.0:
            # Autograd may keep this tensor as .grad and add into it; a second backward through
            # a retained graph must then get a fresh tensor.
            ctx.grad_handed_out = True
            return (grad,) + _NO_GRAD_FOR_THE_REST
        return ((grad * grad_loss).to(grad.dtype),) + _NO_GRAD_FOR_THE_REST
    student, teacher, target, row_stats, count = ctx.saved_tensors
    if grad_loss is None:
        return (torch.zeros_like(student),) + _NO_GRAD_FOR_THE_REST
    # The kernel scales each row by grad_loss (and 1 / count for the mean) itself.
    grad = torch.ops.spacedkd.kd_loss_backward(
        grad_loss.to(row_stats.dtype).contiguous(), student, teacher, target, row_stats, count,
        *ctx.args, ctx.reduction)
    return (grad,) + _NO_GRAD_FOR_THE_REST


torch.library.register_autograd(
    "spacedkd::kd_loss_forward", _backward, setup_context=_setup_context
)
