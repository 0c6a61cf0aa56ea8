// Shared declarations of the spacedkd::kd_loss_* ops: the input contract, the reduction codes
// and the accumulation dtype. The layout of the saved per-row statistics is in row_stats.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "row_stats.h"

namespace spacedkd {

// The reduction argument of kd_loss_forward.
enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// Throws c10::Error (ValueError/TypeError in Python) with the contract in the message when
// the inputs of kd_loss_forward do not satisfy it. Values of targets are checked by the kernels.
void check_kd_inputs(
    const at::Tensor& student,
    const at::Tensor& teacher,
    const at::Tensor& target,
    double temperature,
    double alpha,
    double kd_scale);

void check_reduction(int64_t reduction);

// Checks grad_loss / row_stats / count of kd_loss_backward against the forward inputs.
void check_kd_backward_inputs(
    const at::Tensor& grad_loss,
    const at::Tensor& student,
    const at::Tensor& row_stats,
    const at::Tensor& count,
    int64_t reduction);

// float64 logits accumulate in float64 (gradcheck); every other dtype accumulates in float32.
inline at::ScalarType accumulate_type(at::ScalarType logits) {
  return logits == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace spacedkd
