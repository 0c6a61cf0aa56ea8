// CUDA dispatch of the spacedkd ops: argument checks, output allocation, and a launch on the
// current stream under a device guard. The math is in kd_loss_cuda.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kd_loss.h"
#include "kd_loss_cuda.h"

namespace spacedkd {
namespace {

cuda::LogitsType logits_type(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return cuda::LogitsType::kFloat32;
    case at::kHalf:
      return cuda::LogitsType::kFloat16;
    case at::kBFloat16:
      return cuda::LogitsType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "kd_loss: on CUDA, logits must be float32, float16 or bfloat16, got ",
                       logits.scalar_type(), " (float64 is supported on CPU)");
  }
}

cuda::KDLossParams make_params(const at::Tensor& student, double temperature, double alpha,
                               double kd_scale, int64_t ignore_index) {
  cuda::KDLossParams p;
  p.rows = student.size(0);
  p.cols = student.size(1);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.w_ce = static_cast<float>(1.0 - alpha);
  p.w_kd = static_cast<float>(alpha * kd_scale);
  p.ignore_index = ignore_index;
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_cuda(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& target_in,
    double temperature, double alpha, double kd_scale, int64_t ignore_index, int64_t reduction,
    bool write_grad) {
  check_kd_inputs(student_in, teacher_in, target_in, temperature, alpha, kd_scale);
  check_reduction(reduction);
  const auto type = logits_type(student_in);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = student.size(0), C = student.size(1);
  const auto f32 = student.options().dtype(at::kFloat);
  at::Tensor row_loss = at::empty({B}, f32);
  at::Tensor row_stats = at::empty({B, kNumRowStats}, f32);
  at::Tensor grad = at::empty({write_grad ? B : 0, write_grad ? C : 0}, student.options());
  at::Tensor count = at::empty({}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cuda::KDLossParams params = make_params(student, temperature, alpha, kd_scale, ignore_index);
  if (write_grad) {
    // The gradient is written in the row kernel, already scaled for the mean: a pre-pass over
    // the targets counts the rows, and the kernel reads the count on the device.
    params.share_exp = temperature == 1.0;
    params.peel = true;
    if (reduction == kReductionMean) {
      C10_CUDA_CHECK(cuda::launch_kd_count(target.const_data_ptr<int64_t>(), B, ignore_index,
                                           count.mutable_data_ptr<float>(), stream));
      params.count = count.const_data_ptr<float>();
    }
  }
  C10_CUDA_CHECK(cuda::launch_kd_loss_forward(
      type, student.const_data_ptr(), teacher.const_data_ptr(), target.const_data_ptr<int64_t>(),
      row_loss.mutable_data_ptr<float>(), row_stats.mutable_data_ptr<float>(),
      write_grad ? grad.mutable_data_ptr() : nullptr, params, stream));
  // Reduction, row count and the mean CE / KL in one small kernel on the same stream: no host
  // synchronisation.
  at::Tensor loss = reduction == kReductionNone ? row_loss : at::empty({}, f32);
  at::Tensor parts = at::empty({2}, f32);
  C10_CUDA_CHECK(cuda::launch_kd_loss_reduce(
      row_loss.const_data_ptr<float>(), row_stats.const_data_ptr<float>(),
      target.const_data_ptr<int64_t>(), B, ignore_index, static_cast<int>(reduction),
      reduction == kReductionNone ? nullptr : loss.mutable_data_ptr<float>(),
      count.mutable_data_ptr<float>(), parts.mutable_data_ptr<float>(), stream));
  return {loss, row_stats, grad, count, parts};
}

at::Tensor kd_loss_backward_cuda(
    const at::Tensor& grad_loss_in, const at::Tensor& student_in, const at::Tensor& teacher_in,
    const at::Tensor& target_in, const at::Tensor& row_stats_in, const at::Tensor& count,
    double temperature, double alpha, double kd_scale, int64_t ignore_index, int64_t reduction) {
  check_kd_inputs(student_in, teacher_in, target_in, temperature, alpha, kd_scale);
  check_kd_backward_inputs(grad_loss_in, student_in, row_stats_in, count, reduction);
  const auto type = logits_type(student_in);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor row_stats = row_stats_in.contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options());
  C10_CUDA_CHECK(cuda::launch_kd_loss_backward(
      type, grad_loss.const_data_ptr<float>(), count.const_data_ptr<float>(),
      static_cast<int>(reduction), student.const_data_ptr(), teacher.const_data_ptr(),
      target.const_data_ptr<int64_t>(), row_stats.const_data_ptr<float>(),
      grad.mutable_data_ptr(), make_params(student, temperature, alpha, kd_scale, ignore_index),
      c10::cuda::getCurrentCUDAStream().stream()));
  return grad;
}

void kd_scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK_VALUE(grad.is_contiguous() && scale.numel() == 1 &&
                        scale.scalar_type() == at::kFloat && scale.device() == grad.device(),
                    "_kd_scale_grad_: needs a contiguous gradient and a float32 scalar on its "
                    "device");
  const c10::cuda::CUDAGuard guard(grad.device());
  C10_CUDA_CHECK(cuda::launch_kd_scale_grad(logits_type(grad), grad.mutable_data_ptr(),
                                            grad.numel(), scale.const_data_ptr<float>(),
                                            c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace spacedkd

TORCH_LIBRARY_IMPL(spacedkd, CUDA, m) {
  m.impl("kd_loss_forward", &spacedkd::kd_loss_forward_cuda);
  m.impl("kd_loss_backward", &spacedkd::kd_loss_backward_cuda);
  m.impl("_kd_scale_grad_", &spacedkd::kd_scale_grad_cuda);
}
