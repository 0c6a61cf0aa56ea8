// The one description of the per-row statistics that kd_loss_forward saves for the backward
// (its [B, kNumRowStats] row_stats output, in the accumulation dtype). Torch-free: included by
// the CPU kernels, the CUDA kernels (nvcc) and the _C module, which hands the column names to
// Python (build_info()["row_stats"] -> spacedkd_fast.ops.ROW_STATS).
//
// The backward needs the row maxima and the log-sums, kept apart rather than added into
// log-sum-exp values: exp((s - max) - log Z) is as accurate as softmax itself at any logit
// magnitude, while exp(s - lse) loses the digits that lse loses when rounded at |s| ~ 1e4.
// ce and kl let a trainer log the loss parts without another pass over the logits.
#pragma once

namespace spacedkd {

enum RowStat : int {
  kMaxS = 0,    // max_j s_j
  kMaxT = 1,    // max_j t_j
  kLogZS = 2,   // log sum_j exp(s_j - max_s)
  kLogZST = 3,  // log sum_j exp((s_j - max_s) / T)
  kLogZTT = 4,  // log sum_j exp((t_j - max_t) / T)
  kCE = 5,      // cross-entropy of the row: (max_s - s_y) + log Z_s
  kKL = 6,      // KL(softmax(t/T) || softmax(s/T)) of the row, without alpha or kd_scale
  kNumRowStats = 7
};

// Python's names of the columns, in the order of RowStat.
inline constexpr const char* kRowStatNames[kNumRowStats] = {
    "max_student", "max_teacher", "log_z_student", "log_z_student_T", "log_z_teacher_T",
    "ce", "kl"};

}  // namespace spacedkd
