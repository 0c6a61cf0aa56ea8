// Shared declarations of the spacedkd::kd_loss_* ops: the input contract and the layout of the
// per-row statistics that the forward saves for the backward.
#pragma once

#include <ATen/core/Tensor.h>

namespace spacedkd {

// Columns of the [B, 5] row_stats output of kd_loss_forward, in the accumulation dtype.
// The backward needs only the three log-sum-exp values; ce and kl are kept so that a trainer can
// log the loss parts without another pass over the logits.
enum RowStat : int64_t { kLseS = 0, kLseST = 1, kLseTT = 2, kCE = 3, kKL = 4, kNumRowStats = 5 };

// Throws c10::Error (ValueError/TypeError in Python) with the contract in the message when
// the inputs of kd_loss_forward do not satisfy it. Values of targets are checked by the kernels.
void check_kd_inputs(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const at::Tensor& target,
    double temperature,
    double alpha,
    double kd_scale);

// Checks grad_rows / row_stats of kd_loss_backward against the forward inputs.
void check_kd_backward_inputs(
    const at::Tensor& grad_rows,
    const at::Tensor& student,
    const at::Tensor& row_stats);

// float64 logits accumulate in float64 (gradcheck); every other dtype accumulates in float32.
inline at::ScalarType accumulate_type(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace spacedkd
