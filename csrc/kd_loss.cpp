// Schemas of the spacedkd ops and the argument checks shared by the CPU and CUDA kernels.
// No math lives here: kernels are in cpu/ and cuda/, autograd in kd_loss_autograd.cpp, fake
// kernels (for torch.compile) in Python (spacedkd_fast/ops/kd_op.py).
#include "kd_loss.h"

#include <torch/library.h>

namespace spacedkd {

void check_kd_inputs(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const at::Tensor& target,
    double temperature,
    double alpha,
    double kd_scale) {
  TORCH_CHECK_VALUE(
      student.dim() == 2,
      "kd_loss: student logits must be 2-D [B, C], got ", student.dim(), "-D with shape ",
      student.sizes());
  TORCH_CHECK_VALUE(
      student.sizes() == teacher.sizes(),
      "kd_loss: student and teacher logits must have the same shape [B, C], got student ",
      student.sizes(), " and teacher ", teacher.sizes());
  const auto dtype = student.scalar_type();
  TORCH_CHECK_TYPE(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
      "kd_loss: logits must be floating point (float32, float64, bfloat16 or float16), got ", dtype);
  TORCH_CHECK_TYPE(
      teacher.scalar_type() == dtype,
      "kd_loss: student and teacher logits must have the same dtype, got ", dtype, " and ",
      teacher.scalar_type());
  TORCH_CHECK_VALUE(
      student.size(1) >= 1, "kd_loss: logits need at least one class (C >= 1), got shape ",
      student.sizes());
  TORCH_CHECK_VALUE(
      target.dim() == 1 && target.size(0) == student.size(0),
      "kd_loss: target must be 1-D [B] with B = ", student.size(0), ", got shape ", target.sizes());
  TORCH_CHECK_TYPE(
      target.scalar_type() == at::kLong,
      "kd_loss: target must hold int64 class indices, got ", target.scalar_type());
  TORCH_CHECK_VALUE(
      student.device() == teacher.device() && student.device() == target.device(),
      "kd_loss: student, teacher and target must be on one device, got ", student.device(), ", ",
      teacher.device(), " and ", target.device());
  TORCH_CHECK_VALUE(
      temperature > 0.0 && std::isfinite(temperature),
      "kd_loss: temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(
      alpha >= 0.0 && alpha <= 1.0, "kd_loss: alpha must lie in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(
      std::isfinite(kd_scale), "kd_loss: kd_scale must be finite, got ", kd_scale);
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(
      reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
      "kd_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

void check_kd_backward_inputs(
    const at::Tensor& grad_loss,
    const at::Tensor& student,
    const at::Tensor& row_stats,
    const at::Tensor& count,
    int64_t reduction) {
  check_reduction(reduction);
  const auto acc = accumulate_type(student.scalar_type());
  if (reduction == kReductionNone) {
    TORCH_CHECK_VALUE(
        grad_loss.dim() == 1 && grad_loss.size(0) == student.size(0),
        "kd_loss_backward: grad_loss must be [B] with B = ", student.size(0),
        " for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK_VALUE(
        grad_loss.dim() == 0, "kd_loss_backward: grad_loss must be a scalar for reduction mean "
        "or sum, got shape ", grad_loss.sizes());
  }
  TORCH_CHECK_VALUE(
      row_stats.dim() == 2 && row_stats.size(0) == student.size(0) &&
          row_stats.size(1) == kNumRowStats,
      "kd_loss_backward: row_stats must be [B, ", static_cast<int64_t>(kNumRowStats),
      "] as returned by kd_loss_forward, got ", row_stats.sizes());
  TORCH_CHECK_VALUE(count.dim() == 0, "kd_loss_backward: count must be a scalar, got shape ",
                    count.sizes());
  TORCH_CHECK_TYPE(
      grad_loss.scalar_type() == acc && row_stats.scalar_type() == acc &&
          count.scalar_type() == acc,
      "kd_loss_backward: grad_loss, row_stats and count must be ", acc, " for ",
      student.scalar_type(), " logits, got ", grad_loss.scalar_type(), ", ",
      row_stats.scalar_type(), " and ", count.scalar_type());
  TORCH_CHECK_VALUE(
      grad_loss.device() == student.device() && count.device() == student.device(),
      "kd_loss_backward: grad_loss and count must be on the logits' device ", student.device());
}

}  // namespace spacedkd

TORCH_LIBRARY(spacedkd, m) {
  // Fused KD loss. Per row: (1 - alpha) * CE + alpha * kd_scale * KL(q || p), 0 for ignored
  // rows; reduction 0 (none), 1 (mean over non-ignored rows) or 2 (sum). Returns
  //   loss      [B] for none, [] otherwise
  //   row_stats [B, kNumRowStats]  row maxima, log-sums, CE and KL (columns in row_stats.h)
  //   grad      [B, C]  d loss / d student when write_grad, else an empty tensor
  //                     (for none: d row_loss[b] / d student[b])
  //   count     []      number of non-ignored rows
  //   parts     [2]     mean CE and mean KL (no alpha, no kd_scale) over the non-ignored rows,
  //                     0 when there are none: the loss parts a trainer logs
  // in the accumulation dtype (float32, or float64 for float64 logits); grad in the logits dtype.
  m.def(
      "kd_loss_forward(Tensor student, Tensor teacher, Tensor target, float temperature, "
      "float alpha, float kd_scale, int ignore_index, int reduction, bool write_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradient w.r.t. the student logits, recomputed from the logits and the saved row maxima and
  // log-sums: grad_loss is the gradient of the forward's loss ([B] for reduction none, [] else),
  // count the forward's count; the kernel scales each row itself (one kernel, no extra
  // elementwise launches).
  m.def(
      "kd_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor target, "
      "Tensor row_stats, Tensor count, float temperature, float alpha, float kd_scale, "
      "int ignore_index, int reduction) -> Tensor");
  // Internal (CUDA only, called by the autograd in kd_loss_autograd.cpp): grad *= scale in place,
  // scale a one-element float32 tensor read on the device; no work when it is 1.
  m.def("_kd_scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
}
