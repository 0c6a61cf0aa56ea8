// Fused temperature-softmax KL + cross-entropy + alpha blend: CPU kernels.
//
// Per row (student logits s, teacher logits t, target y, temperature T, invT = 1 / T):
//   lse_s  = logsumexp(s)      lse_sT = logsumexp(s / T)      lse_tT = logsumexp(t / T)
//   (saved as row maxima and log-sums apart, see csrc/row_stats.h)
//   CE     = lse_s - s[y]
//   KL     = sum_j q_j (t_j - s_j) / T - lse_tT + lse_sT       with q = softmax(t / T)
//   loss   = (1 - alpha) CE + alpha kd_scale KL                  (0 for rows with y == ignore_index)
//   d loss / d s = (1 - alpha)(softmax(s) - onehot(y)) + alpha kd_scale invT (softmax(s/T) - q)
//
// Memory traffic is what costs: each row is read from memory once. The kernel makes two passes
// over the row (maxima, then exp-sums), the second one hitting L1/L2, which is cheaper on a CPU
// than an online max/sum that would pay extra exp() calls for the rescaling. float32 rows run
// through a branch-free polynomial exp() that GCC vectorises inside the x86-64-v3 clone
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
#include <cstring>
#include <limits>
#include <vector>

#include "../kd_loss.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SPACEDKD_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SPACEDKD_VECTOR_CLONES
#endif
// x86-64-v3 (AVX2 + FMA + BMI) is dispatched on CPU features; an "arch=haswell" clone would be
// dispatched on the CPU model and skipped on newer Xeons and on AMD parts.
// The row loops must be inlined into each clone: a call to a shared out-of-line copy would run
// the baseline (non-AVX2) code inside the AVX2 clone.
#if defined(__GNUC__)
#define SPACEDKD_INLINE inline __attribute__((always_inline))
#else
#define SPACEDKD_INLINE inline
#endif

namespace spacedkd {
namespace cpu_detail {

// exp(x), about 2 ulp, branch-free, for float32 scalars and for 8-lane vectors (V = float or
// Vec8f). Round-to-nearest of x * log2(e) via the 1.5 * 2^23 trick, Cody-Waite reduction with
// ln 2 split in two, degree-5 polynomial on [-ln2/2, ln2/2] (Cephes' coefficients), then the
// power of two assembled in the exponent bits. Inputs are clamped to [-87, 88]: exp(-87) is
// ~1.6e-38, which the sums below treat as the zero it rounds to in float32.
#if defined(__GNUC__)
typedef float Vec8f __attribute__((vector_size(32)));
typedef int32_t Vec8i __attribute__((vector_size(32)));
#define SPACEDKD_HAVE_VEC8 1
#endif

SPACEDKD_INLINE int32_t float_bits(float x) { return __builtin_bit_cast(int32_t, x); }
SPACEDKD_INLINE float bits_float(int32_t x) { return __builtin_bit_cast(float, x); }
#ifdef SPACEDKD_HAVE_VEC8
SPACEDKD_INLINE Vec8i float_bits(Vec8f x) { return reinterpret_cast<Vec8i&>(x); }
SPACEDKD_INLINE Vec8f bits_float(Vec8i x) { return reinterpret_cast<Vec8f&>(x); }
#endif

template <typename V>
SPACEDKD_INLINE V exp_approx(V x) {
  x = x < -87.0f ? V{} - 87.0f : x;
  x = x > 88.0f ? V{} + 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23
  const V shifted = x * 1.44269504088896341f + shifter;
  const V n = shifted - shifter;
  const auto ni = float_bits(shifted) - float_bits(shifter);
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_float((ni + 127) << 23);
}

SPACEDKD_INLINE float exp_of(float x) { return exp_approx<float>(x); }
SPACEDKD_INLINE double exp_of(double x) { return std::exp(x); }

template <typename acc_t>
struct RowSums {
  acc_t max_s, max_t, z_s, z_sT, z_tT, a;  // a = sum exp((t - max_t)/T) * (t - s)
  bool finite;
};

// Saved per-row values the gradient is computed from (csrc/row_stats.h, RowStat).
template <typename acc_t>
struct RowNorm {
  acc_t max_s, max_t, log_z_s, log_z_sT, log_z_tT;
};

// Scalar row loops: the float64 path (gradcheck) and the tails of the vector loops.
template <typename acc_t>
SPACEDKD_INLINE void maxima_scalar(const acc_t* s, const acc_t* t, int64_t begin, int64_t end,
                                   acc_t& ms, acc_t& mt, acc_t& probe) {
  for (int64_t i = begin; i < end; ++i) {
    ms = s[i] > ms ? s[i] : ms;
    mt = t[i] > mt ? t[i] : mt;
    probe += s[i] * acc_t(0) + t[i] * acc_t(0);  // NaN exactly when an input is inf or NaN
  }
}

// Exp-sums of [begin, end); with kStore the three exponentials of each element are also kept
// (e_s, e_sT, e_tT scratch rows) so that the gradient needs no further exp().
template <bool kStore, typename acc_t>
SPACEDKD_INLINE void sums_scalar(const acc_t* s, const acc_t* t, int64_t begin, int64_t end,
                                 acc_t invT, RowSums<acc_t>& r, acc_t* e_s, acc_t* e_sT,
                                 acc_t* e_tT) {
  const acc_t max_sT = r.max_s * invT, max_tT = r.max_t * invT;
  const bool share = invT == acc_t(1);  // T = 1: exp(s/T - max/T) is exp(s - max), bit for bit
  for (int64_t i = begin; i < end; ++i) {
    const acc_t xs = exp_of(s[i] - r.max_s);
    const acc_t xsT = share ? xs : exp_of(s[i] * invT - max_sT);
    const acc_t xt = exp_of(t[i] * invT - max_tT);
    r.z_s += xs;
    r.z_sT += xsT;
    r.z_tT += xt;
    r.a += xt * (t[i] - s[i]);
    if constexpr (kStore) {
      e_s[i] = xs;
      e_sT[i] = xsT;
      e_tT[i] = xt;
    }
  }
}

// Two passes over the row: maxima (and a finiteness probe), then the four exp-sums with the row
// in cache. float32 runs 8 lanes at a time; the lanes are combined at the end of each pass.
template <bool kStore, typename acc_t>
SPACEDKD_INLINE RowSums<acc_t> row_sums_impl(const acc_t* s, const acc_t* t, int64_t C,
                                             acc_t invT, acc_t* e_s, acc_t* e_sT, acc_t* e_tT) {
  RowSums<acc_t> r{};
  acc_t ms = -std::numeric_limits<acc_t>::infinity(), mt = ms, probe = 0;
  int64_t vec_end = 0;
#ifdef SPACEDKD_HAVE_VEC8
  if constexpr (std::is_same_v<acc_t, float>) {
    vec_end = C - C % 8;
    Vec8f vms = Vec8f{} + ms, vmt = vms, vprobe = Vec8f{};
    for (int64_t i = 0; i < vec_end; i += 8) {
      Vec8f sv, tv;
      std::memcpy(&sv, s + i, sizeof sv);
      std::memcpy(&tv, t + i, sizeof tv);
      vms = sv > vms ? sv : vms;
      vmt = tv > vmt ? tv : vmt;
      vprobe += sv * 0.0f + tv * 0.0f;
    }
    for (int k = 0; k < 8; ++k) {
      ms = vms[k] > ms ? vms[k] : ms;
      mt = vmt[k] > mt ? vmt[k] : mt;
      probe += vprobe[k];
    }
  }
#endif
  maxima_scalar(s, t, vec_end, C, ms, mt, probe);
  r.max_s = ms;
  r.max_t = mt;
  r.finite = (probe == acc_t(0));
  if (!r.finite) return r;
#ifdef SPACEDKD_HAVE_VEC8
  if constexpr (std::is_same_v<acc_t, float>) {
    const float max_sT = ms * invT, max_tT = mt * invT;
    const bool share = invT == 1.0f;  // T = 1 (the ViT recipes): one exp fewer per element
    Vec8f zs{}, zsT{}, ztT{}, a{};
    for (int64_t i = 0; i < vec_end; i += 8) {
      Vec8f sv, tv;
      std::memcpy(&sv, s + i, sizeof sv);
      std::memcpy(&tv, t + i, sizeof tv);
      const Vec8f xs = exp_approx(sv - ms);
      const Vec8f xsT = share ? xs : exp_approx(sv * invT - max_sT);
      const Vec8f xt = exp_approx(tv * invT - max_tT);
      zs += xs;
      zsT += xsT;
      ztT += xt;
      a += xt * (tv - sv);
      if constexpr (kStore) {
        std::memcpy(e_s + i, &xs, sizeof xs);
        std::memcpy(e_sT + i, &xsT, sizeof xsT);
        std::memcpy(e_tT + i, &xt, sizeof xt);
      }
    }
    for (int k = 0; k < 8; ++k) {
      r.z_s += zs[k];
      r.z_sT += zsT[k];
      r.z_tT += ztT[k];
      r.a += a[k];
    }
  }
#endif
  sums_scalar<kStore>(s, t, vec_end, C, invT, r, e_s, e_sT, e_tT);
  return r;
}

// g_j = c_ce softmax(s)_j + c_kd (softmax(s/T)_j - softmax(t/T)_j), each softmax as
// exp((x_j - max) - log Z) with x_j - max exact; the one-hot term is subtracted by the caller.
template <typename acc_t>
SPACEDKD_INLINE void row_grad_impl(const acc_t* s, const acc_t* t, acc_t* g, int64_t C,
                                   acc_t invT, RowNorm<acc_t> n, acc_t c_ce, acc_t c_kd) {
  int64_t vec_end = 0;
#ifdef SPACEDKD_HAVE_VEC8
  if constexpr (std::is_same_v<acc_t, float>) {
    vec_end = C - C % 8;
    for (int64_t i = 0; i < vec_end; i += 8) {
      Vec8f sv, tv;
      std::memcpy(&sv, s + i, sizeof sv);
      std::memcpy(&tv, t + i, sizeof tv);
      const Vec8f ds = sv - n.max_s, dt = tv - n.max_t;
      const Vec8f gv = c_ce * exp_approx(ds - n.log_z_s) +
          c_kd * (exp_approx(ds * invT - n.log_z_sT) - exp_approx(dt * invT - n.log_z_tT));
      std::memcpy(g + i, &gv, sizeof gv);
    }
  }
#endif
  for (int64_t i = vec_end; i < C; ++i) {
    const acc_t ds = s[i] - n.max_s, dt = t[i] - n.max_t;
    g[i] = c_ce * exp_of(ds - n.log_z_s) +
        c_kd * (exp_of(ds * invT - n.log_z_sT) - exp_of(dt * invT - n.log_z_tT));
  }
}

// The same gradient from the exponentials kept by row_sums_impl<true>: no exp() at all.
// k_s = c_ce / Z_s, k_sT = c_kd / Z_sT, k_tT = c_kd / Z_tT.
template <typename acc_t>
SPACEDKD_INLINE void row_grad_from_exps_impl(const acc_t* e_s, const acc_t* e_sT,
                                             const acc_t* e_tT, acc_t* g, int64_t C, acc_t k_s,
                                             acc_t k_sT, acc_t k_tT) {
  for (int64_t i = 0; i < C; ++i) g[i] = k_s * e_s[i] + (k_sT * e_sT[i] - k_tT * e_tT[i]);
}

// Out-of-line float32 entry points carry the clones; float64 needs no speed.
SPACEDKD_VECTOR_CLONES RowSums<float> row_sums_f32(const float* s, const float* t, int64_t C,
                                                   float invT) {
  return row_sums_impl<false, float>(s, t, C, invT, nullptr, nullptr, nullptr);
}

SPACEDKD_VECTOR_CLONES RowSums<float> row_sums_store_f32(const float* s, const float* t,
                                                         int64_t C, float invT, float* e_s,
                                                         float* e_sT, float* e_tT) {
  return row_sums_impl<true, float>(s, t, C, invT, e_s, e_sT, e_tT);
}

SPACEDKD_VECTOR_CLONES void row_grad_f32(const float* s, const float* t, float* g, int64_t C,
                                         float invT, RowNorm<float> n, float c_ce, float c_kd) {
  row_grad_impl<float>(s, t, g, C, invT, n, c_ce, c_kd);
}

SPACEDKD_VECTOR_CLONES void row_grad_from_exps_f32(const float* e_s, const float* e_sT,
                                                   const float* e_tT, float* g, int64_t C,
                                                   float k_s, float k_sT, float k_tT) {
  row_grad_from_exps_impl<float>(e_s, e_sT, e_tT, g, C, k_s, k_sT, k_tT);
}

inline RowSums<float> row_sums(const float* s, const float* t, int64_t C, float invT,
                               float* e_s, float* e_sT, float* e_tT) {
  return e_s ? row_sums_store_f32(s, t, C, invT, e_s, e_sT, e_tT) : row_sums_f32(s, t, C, invT);
}
inline RowSums<double> row_sums(const double* s, const double* t, int64_t C, double invT,
                                double* e_s, double* e_sT, double* e_tT) {
  return e_s ? row_sums_impl<true, double>(s, t, C, invT, e_s, e_sT, e_tT)
             : row_sums_impl<false, double>(s, t, C, invT, nullptr, nullptr, nullptr);
}
inline void row_grad(const float* s, const float* t, float* g, int64_t C, float invT,
                     RowNorm<float> n, float c_ce, float c_kd) {
  row_grad_f32(s, t, g, C, invT, n, c_ce, c_kd);
}
inline void row_grad(const double* s, const double* t, double* g, int64_t C, double invT,
                     RowNorm<double> n, double c_ce, double c_kd) {
  row_grad_impl<double>(s, t, g, C, invT, n, c_ce, c_kd);
}
inline void row_grad_from_exps(const float* e_s, const float* e_sT, const float* e_tT, float* g,
                               int64_t C, float k_s, float k_sT, float k_tT) {
  row_grad_from_exps_f32(e_s, e_sT, e_tT, g, C, k_s, k_sT, k_tT);
}
inline void row_grad_from_exps(const double* e_s, const double* e_sT, const double* e_tT,
                               double* g, int64_t C, double k_s, double k_sT, double k_tT) {
  row_grad_from_exps_impl<double>(e_s, e_sT, e_tT, g, C, k_s, k_sT, k_tT);
}

// Rows handed to one task of the thread pool: enough work (~64k elements) to pay for the
// task, so that [128, 100] runs on one thread while [1024, 1000] uses all of them.
inline int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)); }

// Per-task scratch: widened copies of half-precision rows and the kept exponentials.
// Slots: 0 student, 1 teacher, 2 gradient (when the output dtype differs), 3-5 exponentials.
template <typename scalar_t, typename acc_t>
struct RowScratch {
  std::vector<acc_t> buffer;
  int64_t C;
  explicit RowScratch(int64_t cols, int slots) : buffer(static_cast<size_t>(cols * slots)), C(cols) {}
  acc_t* slot(int k) { return buffer.data() + k * C; }
  const acc_t* view(const scalar_t* row, int k) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return row;
    } else {
      acc_t* out = slot(k);
      for (int64_t i = 0; i < C; ++i) out[i] = static_cast<acc_t>(row[i]);
      return out;
    }
  }
  acc_t* grad_row(scalar_t* out) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return out;
    } else {
      return slot(2);
    }
  }
  void store_grad(scalar_t* out, const acc_t* g) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t i = 0; i < C; ++i) out[i] = static_cast<scalar_t>(g[i]);
    }
  }
};

[[noreturn]] void fail_target(int64_t row, int64_t value, int64_t C, int64_t ignore_index) {
  TORCH_CHECK_INDEX(false, "kd_loss: target[", row, "] = ", value, " is outside [0, ", C,
                    ") and is not ignore_index (", ignore_index, ")");
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& student, const at::Tensor& teacher,
                    const at::Tensor& target, at::Tensor& row_loss, at::Tensor& row_stats,
                    at::Tensor& grad, double temperature, double alpha, double kd_scale,
                    int64_t ignore_index, double grad_scale) {
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
  const acc_t g_scale = static_cast<acc_t>(grad_scale);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  // Lowest offending row, or B if none; reported after the parallel loop so that the error
  // names the same row whatever the thread count.
  std::atomic<int64_t> bad_row{B};

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    RowScratch<scalar_t, acc_t> scratch(C, write_grad ? 6 : 2);
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
      const acc_t* s = scratch.view(s_ptr + b * C, 0);
      const acc_t* t = scratch.view(t_ptr + b * C, 1);
      acc_t *e_s = nullptr, *e_sT = nullptr, *e_tT = nullptr;
      if (write_grad) {
        e_s = scratch.slot(3);
        e_sT = scratch.slot(4);
        e_tT = scratch.slot(5);
      }
      const RowSums<acc_t> r = row_sums(s, t, C, invT, e_s, e_sT, e_tT);
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
        acc_t* g = scratch.grad_row(g_out);
        const acc_t c_ce = g_scale * w_ce, c_kd = g_scale * w_kd * invT;
        row_grad_from_exps(e_s, e_sT, e_tT, g, C, c_ce / r.z_s, c_kd / r.z_sT, c_kd / r.z_tT);
        g[y] -= c_ce;
        scratch.store_grad(g_out, g);
      }
    }
  });
  if (bad_row.load() < B) {
    const int64_t b = bad_row.load();
    fail_target(b, y_ptr[b], C, ignore_index);
  }
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_loss, const at::Tensor& student,
                     const at::Tensor& teacher, const at::Tensor& target,
                     const at::Tensor& row_stats, const at::Tensor& count, at::Tensor& grad,
                     double temperature, double alpha, double kd_scale, int64_t ignore_index,
                     int64_t reduction) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = student.size(0), C = student.size(1);
  const scalar_t* s_ptr = student.const_data_ptr<scalar_t>();
  const scalar_t* t_ptr = teacher.const_data_ptr<scalar_t>();
  const int64_t* y_ptr = target.const_data_ptr<int64_t>();
  const acc_t* gl_ptr = grad_loss.const_data_ptr<acc_t>();
  const acc_t* stats_ptr = row_stats.const_data_ptr<acc_t>();
  // d loss / d row_loss[b]: the incoming gradient, per row (none) or shared (sum, mean / count).
  const acc_t shared_scale = reduction == kReductionNone ? acc_t(0)
      : reduction == kReductionSum ? gl_ptr[0]
      : gl_ptr[0] / std::max(count.const_data_ptr<acc_t>()[0], acc_t(1));
  scalar_t* g_ptr = grad.mutable_data_ptr<scalar_t>();
  const acc_t invT = static_cast<acc_t>(1.0 / temperature);
  const acc_t w_ce = static_cast<acc_t>(1.0 - alpha);
  const acc_t w_kd = static_cast<acc_t>(alpha * kd_scale);

  at::parallel_for(0, B, grain_rows(C), [&](int64_t begin, int64_t end) {
    RowScratch<scalar_t, acc_t> scratch(C, std::is_same_v<scalar_t, acc_t> ? 0 : 3);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t y = y_ptr[b];
      scalar_t* g_out = g_ptr + b * C;
      // Targets were validated by the forward; an ignored row has no gradient.
      if (y == ignore_index || y < 0 || y >= C) {
        std::fill(g_out, g_out + C, scalar_t(0));
        continue;
      }
      const acc_t* st = stats_ptr + b * kNumRowStats;
      const acc_t scale = reduction == kReductionNone ? gl_ptr[b] : shared_scale;
      const acc_t* s = scratch.view(s_ptr + b * C, 0);
      const acc_t* t = scratch.view(t_ptr + b * C, 1);
      acc_t* g = scratch.grad_row(g_out);
      const RowNorm<acc_t> n{st[kMaxS], st[kMaxT], st[kLogZS], st[kLogZST], st[kLogZTT]};
      row_grad(s, t, g, C, invT, n, scale * w_ce, scale * w_kd * invT);
      g[y] -= scale * w_ce;
      scratch.store_grad(g_out, g);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kd_loss_forward_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const at::Tensor& target_in,
    double temperature, double alpha, double kd_scale, int64_t ignore_index, int64_t reduction,
    bool write_grad) {
  check_kd_inputs(student_in, teacher_in, target_in, temperature, alpha, kd_scale);
  check_reduction(reduction);
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t B = student.size(0), C = student.size(1);
  const auto acc_type = accumulate_type(student.scalar_type());
  const auto acc_opts = student.options().dtype(acc_type);
  // Rows that count: the mean divides by them, and the gradient written here is that of the
  // reduced loss, so that the usual loss.backward() (grad_output 1) needs no further pass.
  const int64_t* y_ptr = target.const_data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t b = 0; b < B; ++b) valid += (y_ptr[b] != ignore_index);
  const double grad_scale =
      reduction == kReductionMean ? 1.0 / static_cast<double>(std::max<int64_t>(valid, 1)) : 1.0;
  at::Tensor row_loss = at::empty({B}, acc_opts);
  at::Tensor row_stats = at::empty({B, kNumRowStats}, acc_opts);
  at::Tensor grad = at::empty({write_grad ? B : 0, write_grad ? C : 0}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_forward_cpu", [&] {
        forward_kernel<scalar_t>(student, teacher, target, row_loss, row_stats, grad,
                                 temperature, alpha, kd_scale, ignore_index, grad_scale);
      });
  at::Tensor count = at::empty({}, acc_opts);
  at::Tensor loss = reduction == kReductionNone ? row_loss : at::empty({}, acc_opts);
  at::Tensor parts = at::empty({2}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES(acc_type, "kd_loss_reduce_cpu", [&] {
    count.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(valid);
    // Serial, in double, in row order: the same result whatever the thread count. Ignored rows
    // hold zeros, so the CE and KL columns can be summed over all rows.
    const scalar_t* rows = row_loss.const_data_ptr<scalar_t>();
    const scalar_t* stats = row_stats.const_data_ptr<scalar_t>();
    double total = 0.0, ce = 0.0, kl = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      total += static_cast<double>(rows[b]);
      ce += static_cast<double>(stats[b * kNumRowStats + kCE]);
      kl += static_cast<double>(stats[b * kNumRowStats + kKL]);
    }
    const double inv_count = 1.0 / static_cast<double>(std::max<int64_t>(valid, 1));
    if (reduction != kReductionNone) {
      loss.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(total * grad_scale);
    }
    parts.mutable_data_ptr<scalar_t>()[0] = static_cast<scalar_t>(ce * inv_count);
    parts.mutable_data_ptr<scalar_t>()[1] = static_cast<scalar_t>(kl * inv_count);
  });
  return {loss, row_stats, grad, count, parts};
}

at::Tensor kd_loss_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                                const at::Tensor& teacher_in, const at::Tensor& target_in,
                                const at::Tensor& row_stats_in, const at::Tensor& count,
                                double temperature, double alpha, double kd_scale,
                                int64_t ignore_index, int64_t reduction) {
  check_kd_inputs(student_in, teacher_in, target_in, temperature, alpha, kd_scale);
  check_kd_backward_inputs(grad_loss_in, student_in, row_stats_in, count, reduction);
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor row_stats = row_stats_in.contiguous();
  at::Tensor grad = at::empty(student.sizes(), student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, student.scalar_type(), "kd_loss_backward_cpu", [&] {
        backward_kernel<scalar_t>(grad_loss, student, teacher, target, row_stats, count, grad,
                                  temperature, alpha, kd_scale, ignore_index, reduction);
      });
  return grad;
}

}  // namespace cpu_detail
}  // namespace spacedkd

TORCH_LIBRARY_IMPL(spacedkd, CPU, m) {
  m.impl("kd_loss_forward", &spacedkd::cpu_detail::kd_loss_forward_cpu);
  m.impl("kd_loss_backward", &spacedkd::cpu_detail::kd_loss_backward_cpu);
}
