// Fused temperature-softmax KL + cross-entropy + alpha blend: CPU kernels.
//
// Per row (student logits s, teacher logits t, target y, temperature T, invT = 1 / T):
//   lse_s  = logsumexp(s)      lse_sT = logsumexp(s / T)      lse_tT = logsumexp(t / T)
//   (saved as row maxima and log-sums apart, see csrc/kd_loss.h)
//   CE     = lse_s - s[y]
//   KL     = sum_j q_j (t_j - s_j) / T - lse_tT + lse_sT       with q = softmax(t / T)
//   loss   = (1 - alpha) CE + alpha kd_scale KL                  (0 for rows with y == ignore_index)
//   d loss / d s = (1 - alpha)(softmax(s) - onehot(y)) + alpha kd_scale invT (softmax(s/T) - q)
//
// Memory traffic is what costs: each row is read from memory once. The kernel makes two passes
// over the row (maxima, then exp-sums), the second one hitting L1/L2, which is cheaper on a CPU
// than an online max/sum that would pay extra exp() calls for the rescaling. float32 rows run
// through a branch-free polynomial exp() that GCC vectorises inside the AVX2 clone
// (target_clones); bfloat16/float16 rows are widened to float32 in a per-thread buffer first;
// float64 (gradcheck only) uses std::exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../kd_loss.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SPACEDKD_VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define SPACEDKD_VECTOR_CLONES
#endif

namespace spacedkd {
namespace cpu_detail {

// exp(x) for float32, about 2 ulp, branch-free so that loops calling it vectorise.
// Round-to-nearest of x * log2(e) via the 1.5 * 2^23 trick (no rounding intrinsic needed),
// Cody-Waite reduction with ln 2 split in two, degree-5 polynomial on [-ln2/2, ln2/2], then
// the power of two assembled in the exponent bits. Inputs are clamped to [-87, 88]: exp(-87)
// is ~1.6e-38, which the sums below treat as the zero it rounds to in float32.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const float shifted = x * 1.44269504088896341f + shifter;
  const float n = shifted - shifter;
  const int32_t ni = __builtin_bit_cast(int32_t, shifted) - __builtin_bit_cast(int32_t, shifter);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = __builtin_bit_cast(float, (ni + 127) << 23);
  return p * two_n;
}

inline float exp_of(float x) { return exp_approx(x); }
inline double exp_of(double x) { return std::exp(x); }

// Accumulators live in arrays of kLanes so that the compiler keeps them in vector registers and
// need not reassociate a scalar sum (which it may not do without -ffast-math).
constexpr int kLanes = 16;

template <typename acc_t>
struct RowSums {
  acc_t max_s, max_t, z_s, z_sT, z_tT, a;  // a = sum exp((t - max_t)/T) * (t - s)
  bool finite;
};

template <typename acc_t>
inline RowSums<acc_t> row_sums_impl(const acc_t* s, const acc_t* t, int64_t C, acc_t invT) {
  RowSums<acc_t> r;
  // Pass 1: maxima, and a finiteness probe (x * 0 is NaN exactly when x is inf or NaN).
  acc_t ms[kLanes], mt[kLanes], probe[kLanes];
  for (int k = 0; k < kLanes; ++k) {
    ms[k] = mt[k] = -std::numeric_limits<acc_t>::infinity();
    probe[k] = 0;
  }
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t sv = s[i + k], tv = t[i + k];
      ms[k] = sv > ms[k] ? sv : ms[k];
      mt[k] = tv > mt[k] ? tv : mt[k];
      probe[k] += sv * acc_t(0) + tv * acc_t(0);
    }
  }
  for (int k = 0; i < C; ++i, ++k) {
    ms[k] = s[i] > ms[k] ? s[i] : ms[k];
    mt[k] = t[i] > mt[k] ? t[i] : mt[k];
    probe[k] += s[i] * acc_t(0) + t[i] * acc_t(0);
  }
  acc_t max_s = ms[0], max_t = mt[0], probe_sum = 0;
  for (int k = 0; k < kLanes; ++k) {
    max_s = std::max(max_s, ms[k]);
    max_t = std::max(max_t, mt[k]);
    probe_sum += probe[k];
  }
  r.max_s = max_s;
  r.max_t = max_t;
  r.finite = (probe_sum == acc_t(0));
  if (!r.finite) {
    return r;
  }
  // Pass 2 (row now in cache): the four exp-sums.
  acc_t zs[kLanes], zsT[kLanes], ztT[kLanes], a[kLanes];
  for (int k = 0; k < kLanes; ++k) zs[k] = zsT[k] = ztT[k] = a[k] = 0;
  const acc_t max_sT = max_s * invT, max_tT = max_t * invT;
  i = 0;
  for (; i + kLanes <= C; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t sv = s[i + k], tv = t[i + k];
      zs[k] += exp_of(sv - max_s);
      zsT[k] += exp_of(sv * invT - max_sT);
      const acc_t e = exp_of(tv * invT - max_tT);
      ztT[k] += e;
      a[k] += e * (tv - sv);
    }
  }
  for (int k = 0; i < C; ++i, ++k) {
    zs[k] += exp_of(s[i] - max_s);
    zsT[k] += exp_of(s[i] * invT - max_sT);
    const acc_t e = exp_of(t[i] * invT - max_tT);
    ztT[k] += e;
    a[k] += e * (t[i] - s[i]);
  }
  r.z_s = r.z_sT = r.z_tT = r.a = 0;
  for (int k = 0; k < kLanes; ++k) {
    r.z_s += zs[k];
    r.z_sT += zsT[k];
    r.z_tT += ztT[k];
    r.a += a[k];
  }
  return r;
}

// Saved per-row values the gradient is computed from (csrc/kd_loss.h, RowStat).
template <typename acc_t>
struct RowNorm {
  acc_t max_s, max_t, log_z_s, log_z_sT, log_z_tT;
};

// g_j = c_ce softmax(s)_j + c_kd (softmax(s/T)_j - softmax(t/T)_j), each softmax as
// exp((x_j - max) - log Z) with x_j - max exact; the one-hot term is subtracted by the caller.
template <typename acc_t>
inline void row_grad_impl(const acc_t* s, const acc_t* t, acc_t* g, int64_t C, acc_t invT,
                          RowNorm<acc_t> n, acc_t c_ce, acc_t c_kd) {
  for (int64_t i = 0; i < C; ++i) {
    const acc_t ds = s[i] - n.max_s, dt = t[i] - n.max_t;
    g[i] = c_ce * exp_of(ds - n.log_z_s) +
        c_kd * (exp_of(ds * invT - n.log_z_sT) - exp_of(dt * invT - n.log_z_tT));
  }
}

// Out-of-line float32 entry points carry the AVX2 clone; float64 needs no speed.
SPACEDKD_VECTOR_CLONES RowSums<float> row_sums_f32(
    const float* s, const float* t, int64_t C, float invT) {
  return row_sums_impl<float>(s, t, C, invT);
}

SPACEDKD_VECTOR_CLONES void row_grad_f32(const float* s, const float* t, float* g, int64_t C,
                                         float invT, RowNorm<float> n, float c_ce, float c_kd) {
  row_grad_impl<float>(s, t, g, C, invT, n, c_ce, c_kd);
}

inline RowSums<float> row_sums(const float* s, const float* t, int64_t C, float invT) {
  return row_sums_f32(s, t, C, invT);
}
inline RowSums<double> row_sums(const double* s, const double* t, int64_t C, double invT) {
  return row_sums_impl<double>(s, t, C, invT);
}
inline void row_grad(const float* s, const float* t, float* g, int64_t C, float invT,
                     RowNorm<float> n, float c_ce, float c_kd) {
  row_grad_f32(s, t, g, C, invT, n, c_ce, c_kd);
}
inline void row_grad(const double* s, const double* t, double* g, int64_t C, double invT,
                     RowNorm<double> n, double c_ce, double c_kd) {
  row_grad_impl<double>(s, t, g, C, invT, n, c_ce, c_kd);
}

// Rows handed to one task of the thread pool: enough work (~64k elements) to pay for the
// task, so that [128, 100] runs on one thread while [1024, 1000] uses all of them.
inline int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)); }

// Gives float32/float64 row pointers for logits of any supported dtype: the input itself when it
// already has the accumulation dtype, else a widened copy in a per-task buffer.
template <typename scalar_t, typename acc_t>
struct RowView {
  std::vector<acc_t> buffer;
  const acc_t* view(const scalar_t* row, int64_t C, int slot) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return row;
    } else {
      if (buffer.size() < static_cast<size_t>(3 * C)) buffer.resize(3 * C);
      acc_t* out = buffer.data() + slot * C;
      for (int64_t i = 0; i < C; ++i) out[i] = static_cast<acc_t>(row[i]);
      return out;
    }
  }
  // Where the gradient row is computed: the output itself when its dtype matches.
  acc_t* grad_row(scalar_t* out, int64_t C) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return out;
    } else {
      if (buffer.size() < static_cast<size_t>(3 * C)) buffer.resize(3 * C);
      return buffer.data() + 2 * C;
    }
  }
  void store_grad(scalar_t* out, const acc_t* g, int64_t C) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t i = 0; i < C; ++i) out[i] = static_cast<scalar_t>(g[i]);
    }
  }
};

[[noreturn]] void fail_target(int64_t row, int64_t value, int64_t C, int64_t ignore_index) {
  TORCH_CHECK_INDEX(
      false, "kd_loss: target[", row, "] = ", value, " is outside [0, ", C,
      ") and is not ignore_index (", ignore_index, ")");
}

template <typename scalar_t>
void forward_kernel(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& target,
    at::Tensor& row_loss, at::Tensor& row_stats, at::Tensor& grad, double temperature,
    double alpha, double kd_scale, int64_t ignore_index) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = student.size(0), C = student.size(1);
  const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
  const scalar_t* t_ptr = teacher.const_data_ptr<scalar_t>();
  const int64_t* y_ptr = target.const_data_ptr<int64_t>();
  acc_t* loss_ptr = row_loss.mutable_data_ptr<acc_t>();
  acc_t* stats_ptr = row_stats.mutable_data_ptr<acc_t>();
  const bool write_grad = grad.numel() > 0;
  scalar_t* g_ptr = write_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t invT = static_cast<acc_t>(1.0 / temperature);
  const acc_t w_ce = static_cast<acc_t>(1.0 - alpha);
  const acc_t w_kd = static_cast<acc_t>(alpha * kd_scale);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // First bad row, or B if none; reported after the parallel loop (exceptions inside the pool
  // would be rethrown anyway, but this names the lowest offending row deterministically).
  std::atomic<int64_t> bad_row{B};

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    RowView<scalar_t, acc_t> rows;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = y_ptr[b];
      acc_t* st = stats_ptr + b * kNumRowStats;
      scalar_t* g_out = write_grad ? g_ptr + b * C : nullptr;
      if (y == ignore_index) {
        loss_ptr[b] = 0;
        for (int k = 0; k < kNumRowStats; ++k) st[k] = 0;
        if (write_grad) std::fill(g_out, g_out + C, scalar_t(0));
        continue;
      }
      if (y < 0 || y >= C) {
        int64_t expected = bad_row.load();
        while (b < expected && !bad_row.compare_exchange_weak(expected, b)) {
        }
        continue;
      }
      const acc_t* s = rows.view(s_ptr + b * C, C, 0);
      const acc_t* t = rows.view(t_ptr + b * C, C, 1);
      const RowSums<acc_t> r = row_sums(s, t, C, invT);
      if (!r.finite) {  // non-finite logits: NaN loss (the trainer stops on it), NaN gradient
        loss_ptr[b] = nan;
        for (int k = 0; k < kNumRowStats; ++k) st[k] = nan;
        if (write_grad) std::fill(g_out, g_out + C, static_cast<scalar_t>(nan));
        continue;
      }
      const RowNorm<acc_t> n{r.max_s, r.max_t, std::log(r.z_s), std::log(r.z_sT),
                             std::log(r.z_tT)};
      // CE = lse(s) - s_y; KL = sum q (t - s)/T - lse(t/T) + lse(s/T), written with the maxima
      // apart so that no large value is rounded before the subtraction.
      const acc_t ce = (n.max_s - s[y]) + n.log_z_s;
      const acc_t kl = r.a * invT / r.z_tT + (n.max_s - n.max_t) * invT + n.log_z_sT - n.log_z_tT;
      st[kMaxS] = n.max_s;
      st[kMaxT] = n.max_t;
      st[kLogZS] = n.log_z_s;
      st[kLogZST] = n.log_z_sT;
      st[kLogZTT] = n.log_z_tT;
      st[kCE] = ce;
      st[kKL] = kl;
      loss_ptr[b] = w_ce * ce + w_kd * kl;
      if (write_grad) {
        acc_t* g = rows.grad_row(g_out, C);
        row_grad(s, t, g, C, invT, n, w_ce, w_kd * invT);
        g[y] -= w_ce;
        rows.store_grad(g_out, g, C);
      }
    }
  });
  if (bad_row.load() < B) {
    const int64_t b = bad_row.load();
    fail_target(b, y_ptr[b], C, ignore_index);
  }
}

template <typename scalar_t>
void backward_kernel(
    const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
    const at::Tensor& target, const at::Tensor& row_stats, at::Tensor& grad, double temperature,
    double alpha, double kd_scale, int64_t ignore_index) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = student.size(0), C = student.size(1);
  const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
  const scalar_t* t_ptr = teacher.const_data_ptr<scalar_t>();
  const int64_t* y_ptr = target.const_data_ptr<int64_t>();
  const acc_t* gr_ptr = grad_rows.const_data_ptr<acc_t>();
  const acc_t* stats_ptr = row_stats.const_data_ptr<acc_t>();
  scalar_t* g_ptr = grad.mutable_data_ptr<scalar_t>();
  const acc_t invT = static_cast<acc_t>(1.0 / temperature);
  const acc_t w_ce = static_cast<acc_t>(1.0 - alpha);
  const acc_t w_kd = static_cast<acc_t>(alpha * kd_scale);

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    RowView<scalar_t, acc_t> rows;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = y_ptr[b];
      scalar_t* g_out = g_ptr + b * C;
      // Targets were validated by the forward; an ignored row has no gradient.
      if (y == ignore_index || y < 0 || y >= C) {
        std::fill(g_out, g_out + C, scalar_t(0));
        continue;
      }
      const acc_t* st = stats_ptr + b * kNumRowStats;
      const acc_t scale = gr_ptr[b];
      const acc_t* s = rows.view(s_ptr + b * C, C, 0);
      const acc_t* t = rows.view(t_ptr + b * C, C, 1);
      acc_t* g = rows.grad_row(g_out, C);
      const RowNorm<acc_t> n{st[kMaxS], st[kMaxT], st[kLogZS], st[kLogZST], st[kLogZTT]};
      row_grad(s, t, g, C, invT, n, scale * w_ce, scale * w_kd * invT);
      g[y] -= scale * w_ce;
      rows.store_grad(g_out, g, C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& target_in,
    double temperature, double alpha, double kd_scale, int64_t ignore_index, bool write_grad) {
  check_kd_inputs(student_in, teacher_in, target_in, temperature, alpha, kd_scale);
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = student.size(0), C = student.size(1);
  const auto acc_opts = student.options().dtype(accumulate_type(student.scalar_type()));
  at::Tensor row_loss = at::empty({B}, acc_opts);
  at::Tensor row_stats = at::empty({B, kNumRowStats}, acc_opts);
  at::Tensor grad = at::empty({write_grad ? B : 0, write_grad ? C : 0}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_forward_cpu", [&] {
        forward_kernel<scalar_t>(student, teacher, target, row_loss, row_stats, grad,
                                 temperature, alpha, kd_scale, ignore_index);
      });
  return {row_loss, row_stats, grad};
}

at::Tensor kd_loss_backward_cpu(
    const at::Tensor& grad_rows_in, const at::Tensor& student_in, const at::Tensor& teacher_in,
    const at::Tensor& target_in, const at::Tensor& row_stats_in, double temperature,
    double alpha, double kd_scale, int64_t ignore_index) {
  check_kd_inputs(student_in, teacher_in, target_in, temperature, alpha, kd_scale);
  check_kd_backward_inputs(grad_rows_in, student_in, row_stats_in);
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.contiguous();
  const at::Tensor row_stats = row_stats_in.contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_backward_cpu", [&] {
        backward_kernel<scalar_t>(grad_rows, student, teacher, target, row_stats, grad,
                                  temperature, alpha, kd_scale, ignore_index);
      });
  return grad;
}

}  // namespace cpu_detail
}  // namespace spacedkd

TORCH_LIBRARY_IMPL(spacedkd, CPU, m) {
  m.impl("kd_loss_forward", &spacedkd::cpu_detail::kd_loss_forward_cpu);
  m.impl("kd_loss_backward", &spacedkd::cpu_detail::kd_loss_backward_cpu);
}
