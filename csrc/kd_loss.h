// Shared declarations of the spacedkd::kd_loss_* ops: the input contract and the layout of the
// per-row statistics that the forward saves for the backward.
#pragma once

#include <ATen/core/Tensor.h>

namespace spacedkd {

// Columns of the [B, 7] row_stats output of kd_loss_forward, in the accumulation dtype.
// The backward needs the row maxima and the log-sums, kept apart rather than added into
// log-sum-exp values: exp((s - max) - log Z) is as accurate as softmax itself at any logit
// magnitude, while exp(s - lse) loses the digits that lse loses when rounded at |s| ~ 1e4.
// ce and kl let a trainer log the loss parts without another pass over the logits.
enum RowStat : int64_t {
  kMaxS = 0,     // max_j s_j
  kMaxT = 1,     // max_j t_j
  kLogZS = 2,    // log sum_j exp(s_j - max_s)
  kLogZST = 3,   // log sum_j exp((s_j - max_s) / T)
  kLogZTT = 4,   // log sum_j exp((t_j - max_t) / T)
  kCE = 5,
  kKL = 6,
  kNumRowStats = 7
};

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
