"""Typed wrappers over ``torch.ops.spacedkd`` and their fake kernels.

Importing this module loads the compiled extension (:mod:`.extension`), which registers the ops
with the dispatcher together with their autograd (C++, ``csrc/kd_loss_autograd.cpp``): the
gradient w.r.t. the student logits; the teacher logits and the target get none. The fake kernels
registered here let ``torch.compile`` trace the ops without running them.

Two ways to produce the gradient, chosen per call with ``write_grad`` (``losses.kd_loss`` picks
per device; see benchmarks/test_bench_kd_loss.py for the measurement behind the choice):
- CPU: the forward writes ``d loss / d student`` while the row is still in cache, and the
  backward only scales it by the incoming gradient (or hands it out as it is for gradient 1).
- CUDA (default): the forward saves the row maxima and log-sums; the backward kernel recomputes
  the softmaxes from the logits. Forward-only calls (evaluation, logging) then cost two reads of
  [B, C] instead of three, and nothing of size [B, C] is held between forward and backward.
  :data:`CUDA_GRAD_IN_FORWARD` opts in to the CPU way on CUDA (not yet verified on a GPU).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .extension import load_extension

_C = load_extension()
_INFO = _C.build_info()
if _INFO["torch_version"].split("+")[0] != torch.__version__.split("+")[0]:  # pragma: no cover
    raise ImportError(
        f"spacedkd_fast._C ({_C.__file__}) was built against torch {_INFO['torch_version']} but "
        f"torch {torch.__version__} is running; rebuild with `pip install --no-build-isolation .`"
    )
if "row_stats" not in _INFO:  # pragma: no cover - an extension built before row_stats.h
    raise ImportError(
        f"spacedkd_fast._C ({_C.__file__}) is older than this package's Python code; rebuild "
        "with `pip install --no-build-isolation .` (or `-e .` in a checkout)"
    )

ROW_STATS: tuple[str, ...] = tuple(_INFO["row_stats"])
"""Columns of the ``row_stats`` output of :func:`kd_loss_forward`, as compiled
(``csrc/row_stats.h``)."""
ROW_CE = ROW_STATS.index("ce")
ROW_KL = ROW_STATS.index("kl")


CUDA_GRAD_IN_FORWARD = os.environ.get("SPACEDKD_CUDA_GRAD_IN_FORWARD", "0") == "1"
"""Opt-in (``SPACEDKD_CUDA_GRAD_IN_FORWARD=1``, read at import): on CUDA, ``kd_loss`` has the
forward kernel write the gradient, scaled for the mean in-kernel from a count pre-pass, and the
backward scale it in place on the device (nothing to do for gradient 1). Memory traffic: both
logits read once from DRAM (the kernel's second read of a row, for the gradient, normally hits
L2) and the gradient written once, 6 bytes per element in bf16, against 10 for the default,
which recomputes the gradient in a backward kernel. Off by default until ``gpu_check.sh`` has
verified it on a GPU."""


def build_info() -> dict:
    """How the extension was built: version, torch version, CUDA compiled or not, arch list,
    the ``row_stats`` columns."""
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
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused KD loss, one op call (on CUDA: a row kernel and a one-block reduction kernel).

    Args:
        student, teacher: logits ``[B, C]`` of one floating dtype.
        target: int64 class indices ``[B]``; rows equal to ``ignore_index`` contribute nothing.
        reduction: ``"none"``, ``"mean"`` (over non-ignored rows) or ``"sum"``.
        write_grad: also write ``d loss / d student`` (for ``"none"``: of each row's loss).
    Returns:
        ``(loss, row_stats, grad, count, parts)``: ``loss`` (``[B]`` or ``[]``),
        ``row_stats [B, len(ROW_STATS)]`` (columns :data:`ROW_STATS`), ``count`` (``[]``,
        non-ignored rows) and ``parts`` (``[2]``: mean CE and mean KL over those rows, 0 when
        none) in the accumulation dtype (float32; float64 for float64 logits), and the gradient
        ``[B, C]`` in the logits dtype (empty unless ``write_grad``).
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
    parts = student.new_empty((2,), dtype=acc)
    return loss, row_stats, grad, count, parts


@torch.library.register_fake("spacedkd::kd_loss_backward")
def _kd_loss_backward_fake(grad_loss, student, teacher, target, row_stats, count, temperature,
                           alpha, kd_scale, ignore_index, reduction):
    return torch.empty_like(student, memory_format=torch.contiguous_format)
