// Autograd of spacedkd::kd_loss_forward, in C++ so that a training step pays no Python on the
// op's path (a Python-registered autograd cost ~30 us per call on CPU). Registered for the
// Autograd alias key: the forward redispatches below autograd (to the CPU / CUDA kernels, or
// to the fake kernel that spacedkd_fast/ops/kd_op.py registers for torch.compile), the backward
// calls ops through the dispatcher, so AOTAutograd traces both.
//
// The gradient w.r.t. the student logits comes one of two ways, chosen by the caller with
// write_grad (spacedkd_fast/ops/losses.py picks per device):
// - write_grad: the forward already wrote d loss / d student; the backward only scales it by the
//   incoming gradient, or hands it out as it is when that gradient is a plain CPU scalar equal
//   to 1 (the usual loss.backward()): reading one CPU float is free, a multiply is a pass over
//   [B, C]. On CUDA a kernel scales it in place, doing nothing when the gradient is 1.
// - otherwise: the saved row maxima and log-sums (row_stats.h) and the logits go to
//   kd_loss_backward, which scales each row itself (grad_loss, 1 / count) on the device.
// The teacher logits, the target and the scalars get no gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "kd_loss.h"

namespace spacedkd {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardOutputs call_forward(const Tensor& student, const Tensor& teacher, const Tensor& target,
                            double temperature, double alpha, double kd_scale,
                            int64_t ignore_index, int64_t reduction, bool write_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("spacedkd::kd_loss_forward", "")
          .typed<ForwardOutputs(const Tensor&, const Tensor&, const Tensor&, double, double,
                                double, int64_t, int64_t, bool)>();
  return op.call(student, teacher, target, temperature, alpha, kd_scale, ignore_index,
                 reduction, write_grad);
}

Tensor call_backward(const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
                     const Tensor& target, const Tensor& row_stats, const Tensor& count,
                     double temperature, double alpha, double kd_scale, int64_t ignore_index,
                     int64_t reduction) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("spacedkd::kd_loss_backward", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, double, double, double, int64_t,
                        int64_t)>();
  return op.call(grad_loss, student, teacher, target, row_stats, count, temperature, alpha,
                 kd_scale, ignore_index, reduction);
}

void call_scale_grad(Tensor& grad, const Tensor& scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("spacedkd::_kd_scale_grad_", "")
                             .typed<void(Tensor&, const Tensor&)>();
  op.call(grad, scale);
}

// A real tensor whose memory may be used directly: not a fake, functional or otherwise traced
// tensor (torch.compile, opcheck), and no dispatch mode active.
bool is_real(const Tensor& t) {
  const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                    c10::DispatchKey::Functionalize});
  return t.layout() == at::kStrided && !t.key_set().has_any(traced) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

// True when t is a real CPU scalar equal to 1 (reading one CPU value costs nothing).
bool is_plain_cpu_one(const Tensor& t) {
  if (!t.device().is_cpu() || t.numel() != 1 || !is_real(t)) return false;
  if (t.scalar_type() == at::kFloat) return *t.const_data_ptr<float>() == 1.0f;
  if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>() == 1.0;
  return false;
}

constexpr size_t kNumInputs = 9;  // student, teacher, target, then six non-tensor arguments

class KDLossFunction : public torch::autograd::Function<KDLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& student,
                               const Tensor& teacher, const Tensor& target, double temperature,
                               double alpha, double kd_scale, int64_t ignore_index,
                               int64_t reduction, bool write_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, row_stats, grad, count, parts] = call_forward(
        student, teacher, target, temperature, alpha, kd_scale, ignore_index, reduction,
        write_grad);
    // Gradients of the statistics outputs never flow back; without this autograd would hand
    // the backward zero tensors for them, one of them [B, C].
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({row_stats, grad, count, parts});
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["kd_scale"] = kd_scale;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["write_grad"] = write_grad;
    ctx->saved_data["handed_out"] = false;
    if (write_grad) {
      ctx->save_for_backward({grad});
    } else {
      ctx->save_for_backward({student, teacher, target, row_stats, count});
    }
    return {loss, row_stats, grad, count, parts};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad_loss = grad_outputs[0];
    const auto saved = ctx->get_saved_variables();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    variable_list grads(kNumInputs);
    if (ctx->saved_data["write_grad"].toBool()) {
      Tensor grad = saved[0];
      if (!grad_loss.defined()) {
        grads[0] = at::zeros_like(grad);
      } else if (reduction == kReductionNone) {
        grads[0] = grad.mul(grad_loss.unsqueeze(1)).to(grad.scalar_type());
      } else if (!ctx->saved_data["handed_out"].toBool() && is_plain_cpu_one(grad_loss)) {
        // detach(): a new handle on the same storage and version counter, held by nobody
        // else, which AccumulateGrad adopts as .grad instead of copying it. Autograd may then
        // add into it; a second backward through a retained graph gets a fresh tensor, and an
        // in-place change of .grad in between fails the saved tensor's version check.
        ctx->saved_data["handed_out"] = true;
        grads[0] = grad.detach();
      } else if (grad.is_cuda() && !ctx->saved_data["handed_out"].toBool() && is_real(grad) &&
                 is_real(grad_loss) && grad_loss.scalar_type() == at::kFloat) {
        // CUDA: the value of grad_output stays on the device. The saved gradient is scaled in
        // place by a kernel that does nothing when it is 1 (no host sync, no pass over [B, C]),
        // and handed out. Its version is bumped, so a second backward through a retained graph
        // fails autograd's version check instead of reusing the scaled values.
        ctx->saved_data["handed_out"] = true;
        {
          at::AutoDispatchBelowADInplaceOrView below_autograd;
          call_scale_grad(grad, grad_loss);
        }
        grad.unsafeGetTensorImpl()->bump_version();
        grads[0] = grad.detach();
      } else {
        grads[0] = grad.mul(grad_loss).to(grad.scalar_type());
      }
      return grads;
    }
    const Tensor &student = saved[0], &teacher = saved[1], &target = saved[2];
    const Tensor &row_stats = saved[3], &count = saved[4];
    if (!grad_loss.defined()) {
      grads[0] = at::zeros_like(student, at::TensorOptions(), at::MemoryFormat::Contiguous);
      return grads;
    }
    grads[0] = call_backward(
        grad_loss.to(row_stats.scalar_type()).contiguous(), student, teacher, target, row_stats,
        count, ctx->saved_data["temperature"].toDouble(), ctx->saved_data["alpha"].toDouble(),
        ctx->saved_data["kd_scale"].toDouble(), ctx->saved_data["ignore_index"].toInt(),
        reduction);
    return grads;
  }
};

ForwardOutputs kd_loss_forward_autograd(const Tensor& student, const Tensor& teacher,
                                        const Tensor& target, double temperature, double alpha,
                                        double kd_scale, int64_t ignore_index, int64_t reduction,
                                        bool write_grad) {
  auto out = KDLossFunction::apply(student, teacher, target, temperature, alpha, kd_scale,
                                   ignore_index, reduction, write_grad);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace
}  // namespace spacedkd

TORCH_LIBRARY_IMPL(spacedkd, Autograd, m) {
  m.impl("kd_loss_forward", &spacedkd::kd_loss_forward_autograd);
}
