// Fused temperature-softmax KL + cross-entropy + alpha blend: CUDA kernels.
//
// A forward call runs two kernels: the row kernel, whose single read of both rows of student
// logits s and teacher logits t (C classes) yields, through an online max/sum (a running maximum
// with the sums rescaled whenever it grows),
//   lse(s), lse(s/T), lse(t/T) and a = sum_j exp(t_j/T - max) (t_j - s_j),
// from which CE = lse(s) - s_y and KL(q || p) = a / (T Z_t) - lse(t/T) + lse(s/T) follow
// (computed with the maxima and log-sums kept apart; those are what the backward reads); then a
// one-block kernel that reduces the rows (loss, row count, mean CE and KL). The gradient
// (1 - alpha)(softmax(s) - onehot(y)) + alpha kd_scale / T (softmax(s/T) - q) is written either
// by the row kernel (a second read of the row, usually from L2; the mean's 1 / count is then
// applied by one more elementwise pass in kd_loss_cuda_ops.cpp) or, the default, by the backward
// kernel from the saved row maxima and log-sums (a third kernel, in the backward).
//
// Preconditions (checked by the C++ glue): contiguous [B, C] rows, int64 targets, T > 0. All
// arithmetic in float32, whatever the storage type. Offsets are 64-bit.
// Layout: C <= 1024 -> one warp per row, 4 rows per 128-thread block; otherwise one block per
// row (256 or 512 threads) with a shared-memory combine. 16-byte loads when rows are aligned.
#include "kd_loss_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "../row_stats.h"

namespace spacedkd {
namespace cuda {
namespace {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes of logits: 4 float32 or 8 half/bfloat16 values.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Elements before the first 16-byte boundary of a row: the scalar head that is peeled off so
// that the rest of the row takes 16-byte loads (0 when the row starts aligned).
template <typename T>
__device__ __forceinline__ int64_t peel_count(const T* row, int64_t C) {
  const int64_t offset = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16);
  const int64_t head = offset == 0 ? 0 : (16 - offset) / static_cast<int64_t>(sizeof(T));
  return head < C ? head : C;
}

// Running sums of one thread (or, after the combine, of a whole row).
struct Online {
  float max_s;  // running max of s
  float z_s;    // sum exp(s - max_s)
  float z_sT;   // sum exp((s - max_s) / T)
  float max_t;  // running max of t
  float z_tT;   // sum exp((t - max_t) / T)
  float a;      // sum exp((t - max_t) / T) * (t - s)
};

__device__ __forceinline__ Online online_init() {
  return Online{-FLT_MAX, 0.f, 0.f, -FLT_MAX, 0.f, 0.f};
}

// exp(from - to) with from <= to; exactly 1 when equal so that two empty states stay empty.
__device__ __forceinline__ float rescale(float from, float to, float inv_T) {
  return from == to ? 1.f : __expf((from - to) * inv_T);
}

// Adds n values (already widened to float32) to the running sums. The maximum is raised once
// per group, so the rescaling costs two exp() per group rather than per element.
template <int N>
__device__ __forceinline__ void online_add(Online& st, const float (&s)[N], const float (&t)[N],
                                           float inv_T, bool share_exp) {
  float ps = s[0], pt = t[0];
#pragma unroll
  for (int k = 1; k < N; ++k) {
    ps = fmaxf(ps, s[k]);
    pt = fmaxf(pt, t[k]);
  }
  if (ps > st.max_s) {
    st.z_s *= rescale(st.max_s, ps, 1.f);
    st.z_sT *= rescale(st.max_s, ps, inv_T);
    st.max_s = ps;
  }
  if (pt > st.max_t) {
    const float f = rescale(st.max_t, pt, inv_T);
    st.z_tT *= f;
    st.a *= f;
    st.max_t = pt;
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float ds = s[k] - st.max_s;
    const float es = __expf(ds);
    st.z_s += es;
    st.z_sT += share_exp ? es : __expf(ds * inv_T);  // T = 1: the same value, one exp fewer
    const float e = __expf((t[k] - st.max_t) * inv_T);
    st.z_tT += e;
    st.a += e * (t[k] - s[k]);
  }
}

__device__ __forceinline__ Online online_merge(const Online& x, const Online& y, float inv_T) {
  Online r;
  r.max_s = fmaxf(x.max_s, y.max_s);
  const float xs = rescale(x.max_s, r.max_s, 1.f), ys = rescale(y.max_s, r.max_s, 1.f);
  const float xsT = rescale(x.max_s, r.max_s, inv_T), ysT = rescale(y.max_s, r.max_s, inv_T);
  r.z_s = x.z_s * xs + y.z_s * ys;
  r.z_sT = x.z_sT * xsT + y.z_sT * ysT;
  r.max_t = fmaxf(x.max_t, y.max_t);
  const float xt = rescale(x.max_t, r.max_t, inv_T), yt = rescale(y.max_t, r.max_t, inv_T);
  r.z_tT = x.z_tT * xt + y.z_tT * yt;
  r.a = x.a * xt + y.a * yt;
  return r;
}

__device__ __forceinline__ Online shfl_xor(const Online& st, int mask) {
  Online o;
  o.max_s = __shfl_xor_sync(0xffffffffu, st.max_s, mask);
  o.z_s = __shfl_xor_sync(0xffffffffu, st.z_s, mask);
  o.z_sT = __shfl_xor_sync(0xffffffffu, st.z_sT, mask);
  o.max_t = __shfl_xor_sync(0xffffffffu, st.max_t, mask);
  o.z_tT = __shfl_xor_sync(0xffffffffu, st.z_tT, mask);
  o.a = __shfl_xor_sync(0xffffffffu, st.a, mask);
  return o;
}

// Combines the states of the kThreadsPerRow threads of a row; every thread of the row gets the
// result. For a block per row, warps meet in shared memory.
template <int kThreadsPerRow>
__device__ __forceinline__ Online combine_row(Online st, float inv_T) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) st = online_merge(st, shfl_xor(st, mask), inv_T);
  if constexpr (kThreadsPerRow > 32) {
    constexpr int kWarps = kThreadsPerRow / 32;
    __shared__ Online warp_states[kWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();  // all warps' partial states must be in shared memory before lane reads
    st = lane < kWarps ? warp_states[lane] : online_init();
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) st = online_merge(st, shfl_xor(st, mask), inv_T);
  }
  return st;
}

// Row maxima and log-sums (csrc/row_stats.h, RowStat): softmax(x)_j = exp((x_j - max) - log Z)
// with x_j - max exact, as accurate as a softmax at any logit magnitude.
struct RowNorm {
  float max_s, max_t, log_z_s, log_z_sT, log_z_tT;
};

// Writes g_j = c_ce softmax(s)_j + c_kd (softmax(s/T)_j - softmax(t/T)_j) - c_ce [j == y].
// With share_exp (T = 1, so softmax(s/T) = softmax(s) and log Z_s/T = log Z_s) one exp serves
// both student terms.
template <typename T, int kThreadsPerRow, bool kVec>
__device__ __forceinline__ void write_grad_row(const T* s, const T* t, T* g, int64_t C, int64_t y,
                                               RowNorm n, float inv_T, float c_ce, float c_kd,
                                               int lane, bool share_exp = false) {
  auto grad_of = [&](float sv, float tv, int64_t j) {
    const float ds = sv - n.max_s, dt = tv - n.max_t;
    const float p_s = __expf(ds - n.log_z_s);
    const float p_sT = share_exp ? p_s : __expf(ds * inv_T - n.log_z_sT);
    float v = c_ce * p_s + c_kd * (p_sT - __expf(dt * inv_T - n.log_z_tT));
    return j == y ? v - c_ce : v;
  };
  if constexpr (kVec) {
    // Scalar head up to the 16-byte boundary (s, t and g rows share their offset from it),
    // 16-byte packs, scalar tail.
    using P = Pack<T>;
    const int64_t head = peel_count(s, C);
    for (int64_t j = lane; j < head; j += kThreadsPerRow) {
      g[j] = from_float<T>(grad_of(to_float(s[j]), to_float(t[j]), j));
    }
    const P* sp = reinterpret_cast<const P*>(s + head);
    const P* tp = reinterpret_cast<const P*>(t + head);
    P* gp = reinterpret_cast<P*>(g + head);
    const int64_t packs = (C - head) / P::kSize;
    for (int64_t i = lane; i < packs; i += kThreadsPerRow) {
      const P sv = sp[i], tv = tp[i];
      P out;
#pragma unroll
      for (int k = 0; k < P::kSize; ++k) {
        out.v[k] = from_float<T>(
            grad_of(to_float(sv.v[k]), to_float(tv.v[k]), head + i * P::kSize + k));
      }
      gp[i] = out;
    }
    for (int64_t j = head + packs * P::kSize + lane; j < C; j += kThreadsPerRow) {
      g[j] = from_float<T>(grad_of(to_float(s[j]), to_float(t[j]), j));
    }
  } else {
    for (int64_t j = lane; j < C; j += kThreadsPerRow) {
      g[j] = from_float<T>(grad_of(to_float(s[j]), to_float(t[j]), j));
    }
  }
}

template <typename T, int kThreadsPerRow, int kRowsPerBlock, bool kVec>
__global__ void __launch_bounds__(kThreadsPerRow * kRowsPerBlock)
kd_forward_kernel(const T* __restrict__ student, const T* __restrict__ teacher,
                  const int64_t* __restrict__ target, float* __restrict__ row_loss,
                  float* __restrict__ row_stats, T* __restrict__ grad, KDLossParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int lane = threadIdx.x % kThreadsPerRow;
  // With a block per row the whole block leaves together, so no __syncthreads is skipped.
  if (row >= p.rows) return;
  const int64_t C = p.cols;
  const T* s = student + row * C;
  const T* t = teacher + row * C;
  const int64_t y = target[row];
  float* stats = row_stats + row * kNumRowStats;
  const bool ignored = y == p.ignore_index;
  const bool invalid = !ignored && (y < 0 || y >= C);
  if (ignored || invalid) {
    // Ignored rows contribute nothing; an out-of-range target poisons its row with NaN, which
    // the caller turns into an error (CPU raises directly; CUDA avoids a host sync here).
    const float fill = invalid ? __int_as_float(0x7fc00000) : 0.f;
    if (lane == 0) {
      row_loss[row] = fill;
#pragma unroll
      for (int k = 0; k < kNumRowStats; ++k) stats[k] = fill;
    }
    if (grad != nullptr) {
      for (int64_t j = lane; j < C; j += kThreadsPerRow) grad[row * C + j] = from_float<T>(0.f);
    }
    return;
  }
  const float inv_T = p.inv_temperature;
  const bool share_exp = p.share_exp;
  Online st = online_init();
  if constexpr (kVec) {
    // Scalar head up to the 16-byte boundary, 16-byte packs, scalar tail (write_grad_row).
    using P = Pack<T>;
    const int64_t head = peel_count(s, C);
    for (int64_t j = lane; j < head; j += kThreadsPerRow) {
      const float sf[1] = {to_float(s[j])};
      const float tf[1] = {to_float(t[j])};
      online_add(st, sf, tf, inv_T, share_exp);
    }
    const P* sp = reinterpret_cast<const P*>(s + head);
    const P* tp = reinterpret_cast<const P*>(t + head);
    const int64_t packs = (C - head) / P::kSize;
    for (int64_t i = lane; i < packs; i += kThreadsPerRow) {
      const P sv = sp[i], tv = tp[i];
      float sf[P::kSize], tf[P::kSize];
#pragma unroll
      for (int k = 0; k < P::kSize; ++k) {
        sf[k] = to_float(sv.v[k]);
        tf[k] = to_float(tv.v[k]);
      }
      online_add(st, sf, tf, inv_T, share_exp);
    }
    for (int64_t j = head + packs * P::kSize + lane; j < C; j += kThreadsPerRow) {
      const float sf[1] = {to_float(s[j])};
      const float tf[1] = {to_float(t[j])};
      online_add(st, sf, tf, inv_T, share_exp);
    }
  } else {
    for (int64_t j = lane; j < C; j += kThreadsPerRow) {
      const float sf[1] = {to_float(s[j])};
      const float tf[1] = {to_float(t[j])};
      online_add(st, sf, tf, inv_T, share_exp);
    }
  }
  st = combine_row<kThreadsPerRow>(st, inv_T);
  const RowNorm n{st.max_s, st.max_t, logf(st.z_s), logf(st.z_sT), logf(st.z_tT)};
  if (lane == 0) {
    // CE = lse(s) - s_y and KL = sum q (t - s)/T - lse(t/T) + lse(s/T), maxima kept apart.
    const float ce = (n.max_s - to_float(s[y])) + n.log_z_s;
    const float kl = st.a * inv_T / st.z_tT + (n.max_s - n.max_t) * inv_T + n.log_z_sT - n.log_z_tT;
    row_loss[row] = p.w_ce * ce + p.w_kd * kl;
    stats[kMaxS] = n.max_s;
    stats[kMaxT] = n.max_t;
    stats[kLogZS] = n.log_z_s;
    stats[kLogZST] = n.log_z_sT;
    stats[kLogZTT] = n.log_z_tT;
    stats[kCE] = ce;
    stats[kKL] = kl;
  }
  if (grad != nullptr) {
    // The mean's 1 / count, from the count pre-pass on the same stream (no host sync, no extra
    // pass over the gradient).
    const float inv_count = p.count != nullptr ? 1.f / fmaxf(*p.count, 1.f) : 1.f;
    write_grad_row<T, kThreadsPerRow, kVec>(s, t, grad + row * C, C, y, n, inv_T,
                                            p.w_ce * inv_count, p.w_kd * inv_T * inv_count, lane,
                                            share_exp);
  }
}

template <typename T, int kThreadsPerRow, int kRowsPerBlock, bool kVec>
__global__ void __launch_bounds__(kThreadsPerRow * kRowsPerBlock)
kd_backward_kernel(const float* __restrict__ grad_loss, const float* __restrict__ count,
                   int reduction, const T* __restrict__ student, const T* __restrict__ teacher,
                   const int64_t* __restrict__ target, const float* __restrict__ row_stats,
                   T* __restrict__ grad, KDLossParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int lane = threadIdx.x % kThreadsPerRow;
  if (row >= p.rows) return;
  const int64_t C = p.cols;
  const int64_t y = target[row];
  T* g = grad + row * C;
  if (y == p.ignore_index || y < 0 || y >= C) {
    for (int64_t j = lane; j < C; j += kThreadsPerRow) g[j] = from_float<T>(0.f);
    return;
  }
  const float* stats = row_stats + row * kNumRowStats;
  const RowNorm n{stats[kMaxS], stats[kMaxT], stats[kLogZS], stats[kLogZST], stats[kLogZTT]};
  const float scale = reduction == 0 ? grad_loss[row]
                      : reduction == 2 ? grad_loss[0]
                                       : grad_loss[0] / fmaxf(count[0], 1.f);
  const float inv_T = p.inv_temperature;
  write_grad_row<T, kThreadsPerRow, kVec>(student + row * C, teacher + row * C, g, C, y, n,
                                          inv_T, scale * p.w_ce, scale * p.w_kd * inv_T, lane);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
uintptr_t offset16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16; }

template <typename T>
struct ForwardArgs {
  using Scalar = T;
  const T *s, *t;
  const int64_t* y;
  float *loss, *stats;
  T* grad;
  KDLossParams p;
  cudaStream_t stream;
  bool aligned() const { return aligned16(s) && aligned16(t) && (grad == nullptr || aligned16(grad)); }
  // Rows of s, t (and grad) at one offset from a 16-byte boundary, and peeling asked for.
  bool peelable() const {
    return p.peel && offset16(s) == offset16(t) &&
           (grad == nullptr || offset16(grad) == offset16(s));
  }
};

template <typename T>
struct BackwardArgs {
  using Scalar = T;
  const float* grad_loss;
  const float* count;
  int reduction;
  const T *s, *t;
  const int64_t* y;
  const float* stats;
  T* grad;
  KDLossParams p;
  cudaStream_t stream;
  bool aligned() const { return aligned16(s) && aligned16(t) && aligned16(grad); }
  bool peelable() const { return false; }  // the default path keeps its scalar fallback
};

template <typename T, int kThreads, int kRows, bool kVec>
cudaError_t run(const ForwardArgs<T>& a, dim3 grid) {
  kd_forward_kernel<T, kThreads, kRows, kVec>
      <<<grid, kThreads * kRows, 0, a.stream>>>(a.s, a.t, a.y, a.loss, a.stats, a.grad, a.p);
  return cudaGetLastError();
}

template <typename T, int kThreads, int kRows, bool kVec>
cudaError_t run(const BackwardArgs<T>& a, dim3 grid) {
  kd_backward_kernel<T, kThreads, kRows, kVec>
      <<<grid, kThreads * kRows, 0, a.stream>>>(a.grad_loss, a.count, a.reduction, a.s, a.t, a.y,
                                                a.stats, a.grad, a.p);
  return cudaGetLastError();
}

// Picks the row layout and whether 16-byte loads are used: aligned pointers and rows a multiple
// of 16 bytes (every row starts aligned), or, where peeling is asked for, rows that share their
// offset from a 16-byte boundary (each row peels a scalar head); otherwise scalar loads.
template <typename Args>
cudaError_t dispatch_layout(const Args& a) {
  using T = typename Args::Scalar;
  const KDLossParams& p = a.p;
  const bool vec = (a.aligned() && (p.cols * static_cast<int64_t>(sizeof(T))) % 16 == 0) ||
                   a.peelable();
  if (p.cols <= 1024) {
    constexpr int kRows = 4;
    const dim3 grid(static_cast<unsigned>((p.rows + kRows - 1) / kRows));
    return vec ? run<T, 32, kRows, true>(a, grid) : run<T, 32, kRows, false>(a, grid);
  }
  const dim3 grid(static_cast<unsigned>(p.rows));
  if (p.cols <= 16384) {
    return vec ? run<T, 256, 1, true>(a, grid) : run<T, 256, 1, false>(a, grid);
  }
  return vec ? run<T, 512, 1, true>(a, grid) : run<T, 512, 1, false>(a, grid);
}

template <typename T>
cudaError_t forward_typed(const void* s, const void* t, const int64_t* y, float* loss,
                          float* stats, void* grad, const KDLossParams& p, cudaStream_t stream) {
  return dispatch_layout(ForwardArgs<T>{static_cast<const T*>(s), static_cast<const T*>(t), y,
                                        loss, stats, static_cast<T*>(grad), p, stream});
}

template <typename T>
cudaError_t backward_typed(const float* grad_loss, const float* count, int reduction,
                           const void* s, const void* t, const int64_t* y, const float* stats,
                           void* grad, const KDLossParams& p, cudaStream_t stream) {
  return dispatch_layout(BackwardArgs<T>{grad_loss, count, reduction, static_cast<const T*>(s),
                                         static_cast<const T*>(t), y, stats,
                                         static_cast<T*>(grad), p, stream});
}

// One block sums the row losses and the CE / KL columns of the non-ignored rows in a fixed
// order: each thread a strided slice, then a shuffle tree per warp and one over the warps. NaN
// rows (bad targets, non-finite logits) propagate into the sums on purpose.
constexpr int kReduceThreads = 1024;
constexpr int kReduceSums = 4;  // row loss, CE, KL, row count

__global__ void __launch_bounds__(kReduceThreads)
kd_reduce_kernel(const float* __restrict__ row_loss, const float* __restrict__ row_stats,
                 const int64_t* __restrict__ target, int64_t rows, int64_t ignore_index,
                 int reduction, float* __restrict__ loss, float* __restrict__ count,
                 float* __restrict__ parts) {
  float acc[kReduceSums] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t i = threadIdx.x; i < rows; i += kReduceThreads) {
    if (target[i] != ignore_index) {
      acc[0] += row_loss[i];
      acc[1] += row_stats[i * kNumRowStats + kCE];
      acc[2] += row_stats[i * kNumRowStats + kKL];
      acc[3] += 1.f;
    }
  }
#pragma unroll
  for (int k = 0; k < kReduceSums; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      acc[k] += __shfl_down_sync(0xffffffffu, acc[k], offset);
    }
  }
  __shared__ float warp_acc[kReduceSums][kReduceThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kReduceSums; ++k) warp_acc[k][warp] = acc[k];
  }
  __syncthreads();  // every warp's partial sums must be visible to warp 0
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kReduceSums; ++k) {
      acc[k] = warp_acc[k][lane];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        acc[k] += __shfl_down_sync(0xffffffffu, acc[k], offset);
      }
    }
    if (lane == 0) {
      const float n = acc[3], divisor = fmaxf(n, 1.f);
      count[0] = n;
      if (reduction == 2) loss[0] = acc[0];
      if (reduction == 1) loss[0] = acc[0] / divisor;
      parts[0] = acc[1] / divisor;
      parts[1] = acc[2] / divisor;
    }
  }
}

// The number of non-ignored rows, for the gradient that the forward writes under reduction mean.
__global__ void __launch_bounds__(kReduceThreads)
kd_count_kernel(const int64_t* __restrict__ target, int64_t rows, int64_t ignore_index,
                float* __restrict__ count) {
  float n = 0.f;
  for (int64_t i = threadIdx.x; i < rows; i += kReduceThreads) n += target[i] != ignore_index;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) n += __shfl_down_sync(0xffffffffu, n, offset);
  __shared__ float warp_n[kReduceThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_n[warp] = n;
  __syncthreads();  // every warp's count must be visible to warp 0
  if (warp == 0) {
    n = warp_n[lane];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) n += __shfl_down_sync(0xffffffffu, n, offset);
    if (lane == 0) count[0] = n;
  }
}

// grad *= scale[0] in place; every block leaves at once when scale[0] == 1 (the usual
// loss.backward()), so that case costs a launch and no pass over the gradient.
template <typename T>
__global__ void kd_scale_grad_kernel(T* __restrict__ grad, int64_t numel,
                                     const float* __restrict__ scale) {
  const float k = *scale;
  if (k == 1.f) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    grad[i] = from_float<T>(to_float(grad[i]) * k);
  }
}

template <typename T>
cudaError_t scale_grad_typed(void* grad, int64_t numel, const float* scale, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 4096);
  kd_scale_grad_kernel<T><<<static_cast<unsigned>(std::max<int64_t>(blocks, 1)), kThreads, 0,
                            stream>>>(static_cast<T*>(grad), numel, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_kd_count(const int64_t* target, int64_t rows, int64_t ignore_index,
                            float* count, cudaStream_t stream) {
  kd_count_kernel<<<1, kReduceThreads, 0, stream>>>(target, rows, ignore_index, count);
  return cudaGetLastError();
}

cudaError_t launch_kd_scale_grad(LogitsType type, void* grad, int64_t numel, const float* scale,
                                 cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  switch (type) {
    case LogitsType::kFloat32:
      return scale_grad_typed<float>(grad, numel, scale, stream);
    case LogitsType::kFloat16:
      return scale_grad_typed<__half>(grad, numel, scale, stream);
    case LogitsType::kBFloat16:
      return scale_grad_typed<__nv_bfloat16>(grad, numel, scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_kd_loss_forward(LogitsType type, const void* student, const void* teacher,
                                   const int64_t* target, float* row_loss, float* row_stats,
                                   void* grad, const KDLossParams& params, cudaStream_t stream) {
  if (params.rows == 0) return cudaSuccess;
  switch (type) {
    case LogitsType::kFloat32:
      return forward_typed<float>(student, teacher, target, row_loss, row_stats, grad, params, stream);
    case LogitsType::kFloat16:
      return forward_typed<__half>(student, teacher, target, row_loss, row_stats, grad, params, stream);
    case LogitsType::kBFloat16:
      return forward_typed<__nv_bfloat16>(student, teacher, target, row_loss, row_stats, grad,
                                          params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_kd_loss_backward(LogitsType type, const float* grad_loss, const float* count,
                                    int reduction, const void* student, const void* teacher,
                                    const int64_t* target, const float* row_stats, void* grad,
                                    const KDLossParams& params, cudaStream_t stream) {
  if (params.rows == 0) return cudaSuccess;
  switch (type) {
    case LogitsType::kFloat32:
      return backward_typed<float>(grad_loss, count, reduction, student, teacher, target,
                                   row_stats, grad, params, stream);
    case LogitsType::kFloat16:
      return backward_typed<__half>(grad_loss, count, reduction, student, teacher, target,
                                    row_stats, grad, params, stream);
    case LogitsType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_loss, count, reduction, student, teacher, target,
                                           row_stats, grad, params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_kd_loss_reduce(const float* row_loss, const float* row_stats,
                                  const int64_t* target, int64_t rows, int64_t ignore_index,
                                  int reduction, float* loss, float* count, float* parts,
                                  cudaStream_t stream) {
  kd_reduce_kernel<<<1, kReduceThreads, 0, stream>>>(row_loss, row_stats, target, rows,
                                                     ignore_index, reduction, loss, count, parts);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace spacedkd
