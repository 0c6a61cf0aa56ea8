// Launchers of the fused KD-loss CUDA kernels. This header and kd_loss_cuda.cu know nothing of
// torch: raw device pointers, sizes and a stream, so that nvcc compiles them in seconds.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace spacedkd {
namespace cuda {

enum class LogitsType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct KDLossParams {
  int64_t rows;          // B
  int64_t cols;          // C
  float inv_temperature; // 1 / T
  float w_ce;            // 1 - alpha
  float w_kd;            // alpha * kd_scale
  int64_t ignore_index;
  // Forward with a gradient only (both unused otherwise):
  const float* count = nullptr;  // device scalar; set: the gradient is divided by max(count, 1)
  bool share_exp = false;        // T == 1: one exp serves softmax(s) and softmax(s / T)
  bool peel = false;             // rows not 16-byte aligned: peel a scalar head, then 16-byte loads
};

// row_loss [B] and row_stats [B, kNumRowStats] (csrc/row_stats.h) are float32; grad [B, C] has
// the logits' type and may be null (no gradient written). Returns the launch status (cudaGetLastError after the launch).
cudaError_t launch_kd_loss_forward(
    LogitsType type, const void* student, const void* teacher, const int64_t* target,
    float* row_loss, float* row_stats, void* grad, const KDLossParams& params,
    cudaStream_t stream);

// loss[0] = sum (reduction 2) or mean over non-ignored rows (reduction 1) of row_loss,
// count[0] = number of non-ignored rows, parts[0..1] = mean CE and mean KL of those rows (from
// row_stats); one block, fixed summation order (deterministic). With reduction 0 loss is not
// written. Runs for rows == 0 too (writes zeros).
cudaError_t launch_kd_loss_reduce(const float* row_loss, const float* row_stats,
                                  const int64_t* target, int64_t rows, int64_t ignore_index,
                                  int reduction, float* loss, float* count, float* parts,
                                  cudaStream_t stream);

// count[0] = number of rows whose target is not ignore_index (one block): the pre-pass that lets
// the forward kernel apply the mean's 1 / count to the gradient it writes.
cudaError_t launch_kd_count(const int64_t* target, int64_t rows, int64_t ignore_index,
                            float* count, cudaStream_t stream);

// grad[i] *= scale[0] in place over numel elements, read on the device; nothing is read or
// written when scale[0] == 1 (no host synchronisation, CUDA-graph safe).
cudaError_t launch_kd_scale_grad(LogitsType type, void* grad, int64_t numel, const float* scale,
                                 cudaStream_t stream);

// grad[b, :] = scale_b * d row_loss[b] / d student[b, :] from the saved row_stats, with scale_b
// = grad_loss[b] (reduction 0), grad_loss[0] (2) or grad_loss[0] / max(count[0], 1) (1), read
// on the device: no host synchronisation and no extra launches.
cudaError_t launch_kd_loss_backward(
    LogitsType type, const float* grad_loss, const float* count, int reduction,
    const void* student, const void* teacher, const int64_t* target, const float* row_stats,
    void* grad, const KDLossParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace spacedkd
