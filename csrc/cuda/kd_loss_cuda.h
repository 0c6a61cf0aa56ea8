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
};

// row_loss [B] and row_stats [B, 7] are float32; grad [B, C] has the logits' type and may be
// null (no gradient written). Returns the launch status (cudaGetLastError after the launch).
cudaError_t launch_kd_loss_forward(
    LogitsType type, const void* student, const void* teacher, const int64_t* target,
    float* row_loss, float* row_stats, void* grad, const KDLossParams& params,
    cudaStream_t stream);

// grad[b, :] = grad_rows[b] * d row_loss[b] / d student[b, :], from the saved row_stats.
cudaError_t launch_kd_loss_backward(
    LogitsType type, const float* grad_rows, const void* student, const void* teacher,
    const int64_t* target, const float* row_stats, void* grad, const KDLossParams& params,
    cudaStream_t stream);

}  // namespace cuda
}  // namespace spacedkd
