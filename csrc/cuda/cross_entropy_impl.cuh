// Softmax cross-entropy over input (N, C, D) (torch-free: CUDA headers only). Included by
// cross_entropy_<dtype>.cu, one translation unit per dtype, so that a build compiles the four in
// parallel (one nvcc of all of them took 2.5 min for sm_90 alone on the 2-core VM).
//
// Kernels:
//  - row kernel (D == 1, C >= 64): a warp (C small) or a block (C large) per row. Pass 1 reads the
//    row once with 16-byte vector loads and keeps an online max / sum of exp (plus the sums the
//    label-smoothing and probability-target terms need, relative to the running max); one
//    fixed-order group reduction; pass 2 re-reads the row (an L2 hit) and writes the gradient.
//    A forward that writes the gradient of a short row (class index, up to 512 K vectors) holds
//    each thread's share of the row in registers instead (RowCache): one read.
//    The row is entirely read before any gradient element is written (the group reduction is a
//    barrier), so grad_input may alias input. The forward saves the row statistics m and
//    log s apart (and u = sum w t' for probability targets); a backward op reads them and runs
//    pass 2 only: one read of the row, one write of its gradient. (Their rounded sum, the lse,
//    would cost the softmax up to ulp(lse)/2 of relative accuracy: 5e-4 for float logits near
//    1e4.)
//  - split rows (class index; launchers.h: ce_split_count, ce_cluster_count): a row cut into S
//    slices, one block each, for few long rows (or, on sm_90, rows of >= 256 KiB): on sm_90 the S
//    blocks form a thread-block cluster that keeps the row in shared memory (read once from
//    DRAM) and exchanges the slices' statistics through distributed shared memory; elsewhere two
//    kernels with the partials in global memory. See the split section.
//  - column kernel (D > 1, or few classes): one thread per position (n, d) walking c with stride
//    D, so a warp reads 32 consecutive d (coalesced). The contiguous (N, C, D) with D a multiple
//    of V = 16 / sizeof(T) and aligned arrays runs the vector column kernel instead: one thread
//    per V consecutive d, one 16-byte load per class for all V; pass 1 folds V classes at once
//    per position (the row functors' compute<V>, so it rounds unlike the column kernel).
//  - deterministic two-stage sums (common.cuh) for W = sum of target weights (computed before the
//    main kernel so the fused gradient can use 1/W without a host sync), the class-weight sum and
//    the reduction of the per-row losses.
// LLM-training extras (issue 9): soft-capping is a template flag (kCap) of every kernel: each
// loaded logit x becomes cap tanh(x / cap), each gradient element gets the factor 1 - t^2; off,
// the hot loops are unchanged. z-loss (z lse^2 per non-ignored row) is per row only: a loss term
// and a change of the softmax's coefficient (2 z lse) in the gradient.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cstring>
#include <type_traits>

#include "cuda/ce_layout.h"
#include "cuda/common.cuh"
#include "losses/math.h"

namespace torch_losses {
namespace cuda {
namespace {

#define TL_CE_TARGET_CHECK "torch_losses cross_entropy: target class index out of bounds (0 <= target < C)"

template <typename A>
__device__ __forceinline__ A fexp(A v);
template <>
__device__ __forceinline__ float fexp<float>(float v) { return expf(v); }
template <>
__device__ __forceinline__ double fexp<double>(double v) { return exp(v); }
__device__ __forceinline__ float flog(float v) { return logf(v); }
__device__ __forceinline__ double flog(double v) { return log(v); }
__device__ __forceinline__ float fmax_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double fmax_(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float ftanh(float v) { return tanhf(v); }
__device__ __forceinline__ double ftanh(double v) { return tanh(v); }


// exp(d) for the hot loops' d <= 0 (a logit minus the row max): 2^(d log2 e) costs a multiply
// and the MUFU.EX2 unit. float: exp2f (2 ulp, as expf, with its denormal handling); bf16/fp16
// rows (kApprox): ex2.approx.ftz (2^-22 relative; results below 2^-126 flush to 0), far below
// the 2^-8 / 2^-11 rounding of the output. The emulator runs the host's exp2f.
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float ex2_approx_ftz(float e) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(e));
  return r;
#else
  return exp2f(e);
#endif
}
template <bool kApprox>
__device__ __forceinline__ float exp2_hot(float e) {
  return kApprox ? ex2_approx_ftz(e) : exp2f(e);
}
template <bool kApprox>
__device__ __forceinline__ float exp_hot(float d) {
  return exp2_hot<kApprox>(d * kLog2e);
}
template <bool kApprox>
__device__ __forceinline__ double exp_hot(double d) {
  return exp(d);
}
// The hot loops use the approximate exp for 16-bit logits.
template <typename T>
constexpr bool kApproxExp = sizeof(T) == 2;

// softmax_c = exp((x - m) - log_s) given ls2 = log_s log2(e): one FADD, one FFMA, one exp2.
template <bool kApprox>
__device__ __forceinline__ float softmax_hot(float x, float m, float log_s, float ls2) {
  const float e = fmaf(x - m, kLog2e, -ls2);
  return kApprox ? ex2_approx_ftz(e) : exp2f(e);
}
template <bool kApprox>
__device__ __forceinline__ double softmax_hot(double x, double m, double log_s, double) {
  return exp((x - m) - log_s);
}

// Products the online-softmax merge must not contract into an FMA (nvcc does by default): both
// butterfly partners then round alike.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Soft-capping (kCap): the logit x as the softmax sees it, cap tanh(x / cap), and in `dcap` its
// derivative 1 - tanh^2 (an unused dcap is dropped by the compiler). The product is rounded on
// its own (no FMA with the x - max that follows), so that every pass sees the same capped logit:
// the max's own term is then exactly exp(0) = 1.
// float/double rows: tanhf/tanh, dcap = (1 - t)(1 + t) (1 - t exact near |t| = 1).
// bf16/fp16 rows (kApprox, as their exp): one ex2.approx and one approximate division,
// E = e^(-2|u|), t = sign(u) (1 - E) / (1 + E), dcap = 4 E / (1 + E)^2: dcap keeps its
// relative accuracy where it is small, t its absolute accuracy (~2^-23). Below |u| = 1/8, where
// 1 - E cancels (t = 0 for |u| < 2^-25: the logits of a softcap far above them came out 0),
// t = u - u^3 / 3 + 2 u^5 / 15 instead (relative error < 2^-22 there, < 2^-20 just above): the
// capped logit is relatively accurate for every cap, as torch's composite. (MUFU-bound loops:
// the series' FMA-pipe instructions are predicted to cost no time.)
constexpr float kTanhSeriesMax = 0.125f;
template <bool kCap, bool kApprox, typename A>
__device__ __forceinline__ A capped(A x, A cap, A inv_cap, A& dcap) {
  if (!kCap) return x;
  const A u = x * inv_cap;
  if constexpr (kApprox) {
    const float au = fabsf(u);
    const float E = ex2_approx_ftz(au * (-2.0f * kLog2e));  // NaN stays NaN
    const float r = __fdividef(1.0f, 1.0f + E);
    dcap = 4.0f * E * r * r;
    const float u2 = u * u;
    const float series = fmaf(u * u2, fmaf(u2, 2.0f / 15.0f, -1.0f / 3.0f), u);
    return mul_rn(cap, au < kTanhSeriesMax ? series : copysignf((1.0f - E) * r, u));
  } else {
    const A t = ftanh(u);
    dcap = (A(1) - t) * (A(1) + t);
    return mul_rn(cap, t);
  }
}
template <bool kCap, bool kApprox, typename A>
__device__ __forceinline__ A capped(A x, A cap, A inv_cap) {
  A dcap;
  return capped<kCap, kApprox>(x, cap, inv_cap, dcap);
}


// The row statistics, kept relative to the running max m so that no large logit enters a
// difference of two large numbers: the loss is formed at the end as (m - x) + log(s).
template <typename A>
struct Stats {
  A m, s;  // running max and sum of exp(x - m); a NaN logit makes s NaN
  A u, d;  // linear terms: weights u_c folded so far, and d = sum u_c (m - x_c)
};

// The folded exp's offset ml = m log2 e rounded (RunningStats, float) is off m log2 e by at
// most 2^-24 |m| log2 e: under 12 for |m| <= kFoldMaxM = 2^27, where the terms
// 2^((x - m) log2 e + that) stay far inside float's range. A row (or split slice, or column
// position) whose max exceeds 2^26 in magnitude takes its sum of exp again, unfolded
// (sum_exp_unfolded); a walk beyond 2^27 inside a row within 2^26 has a max below -2^27, and its
// terms vanish next to the row's max.
constexpr float kFoldMaxM = 134217728.0f;  // 2^27
__device__ __forceinline__ bool needs_unfolded_sum(float m) {
  return isfinite(m) && fabsf(m) > 0.5f * kFoldMaxM;
}
__device__ __forceinline__ bool needs_unfolded_sum(double) { return false; }

// Stats as a walk folds logits into them. float: each term is 2^(x log2 e - ml), one FFMA
// before the exp where (x - m) log2 e took an FADD and an FMUL: ml = m log2 e rounded is the
// same offset for every term (and the x log2 e product exact inside the FFMA), so only s
// carries it, and stats() takes it back out exactly (the residual m log2 e - ml by an FMA).
// mm, the max the linear terms are taken from (m, or 0 while m is -inf), is set where m is
// rather than selected at each step. (Stats stays 16 bytes: shared memory and the split
// partials hold it.)
template <typename A>
struct RunningStats {
  static constexpr bool kFold = sizeof(A) == 4;
  // ml's floor, below every walk in range (|m| log2 e < 2^27.53): a walk below it sums terms
  // of at most 1 (no inf to turn into NaN when a later max rebases them by 0). Also ml while
  // m is -inf: the terms of -inf logits are 0, and the first rebase multiplies by at most 1.
  static constexpr float kMlFloor = -2.0f * kFoldMaxM;
  // An empty walk.
  A m = A(-INFINITY), s = 0, u = 0, d = 0;  // as Stats, but s relative to ml (kFold)
  A mm = 0;
  A ml = A(kMlFloor);  // kFold: max(m log2 e rounded, kMlFloor)

  // The walk's statistics, s relative to m. The max's own term 2^(m log2 e - ml), recomputed
  // as the walk summed it, goes back to exactly 1 (a one-class row's loss stays 0), the others
  // are scaled by 2^-(m log2 e - ml) (the residual exact by an FMA). Beyond kFoldMaxM, s stays
  // as summed (needs_unfolded_sum): finite below -kFoldMaxM, where a merge with the row's max
  // scales it by exp(<= -2^26) = 0, and replaced wherever the row's own max is that far out.
  template <bool kApprox>
  __device__ __forceinline__ Stats<A> stats() const {
    Stats<A> r{m, s, u, d};
    if constexpr (kFold) {
      if (fabsf(m) <= kFoldMaxM) {
        const A delta = fmaf(m, kLog2e, -ml);
        r.s = A(1) + (s - exp2_hot<kApprox>(delta)) * exp2_hot<kApprox>(-delta);
      }
    }
    return r;
  }

  // The online softmax step: fold N more logits into the running max and sum of exp.
  template <bool kApprox, int N>
  __device__ __forceinline__ void push(const A (&v)[N]) {
    A vmax = v[0];
#pragma unroll
    for (int i = 1; i < N; ++i) vmax = fmax_(vmax, v[i]);  // drops NaN: the sum keeps it
    push_max<kApprox>(v, vmax);
  }
  // The same given vmax, the largest v (NaN only if every v is NaN: then no rebase, as for -inf).
  template <bool kApprox, int N>
  __device__ __forceinline__ void push_max(const A (&v)[N], A vmax) {
    if (vmax > m) {
      const A dm = m - vmax;  // one difference for both rebases
      if constexpr (kFold) {
        const A ml_new = fmaxf(vmax * kLog2e, kMlFloor);
        s *= exp2_hot<kApprox>(ml - ml_new);
        ml = ml_new;
      } else {
        s *= exp_hot<kApprox>(dm);
      }
      if (m != -INFINITY) d -= dm * u;
      m = vmax;
      mm = vmax;  // > -inf
    }
    // While m is -inf, every logit so far is -inf or NaN: its term is 0, or NaN for a NaN, so
    // one branch-free sum covers both cases.
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if constexpr (kFold) s += exp2_hot<kApprox>(fmaf(v[i], kLog2e, -ml));
      else s += exp_hot<kApprox>(v[i] - mm);
    }
  }

  // Folds u_c (m - x_c) for N logits already pushed (m covers them). While m is -inf, every
  // logit so far is -inf (or NaN) and its term is +inf (NaN). u takes the vector's weight sum
  // at once (N, folded, without class weights).
  // A scalar (N == 1), and float/double rows, rebase each term on m on its own: the max's term
  // is exactly 0 (a one-class row's loss is 0, no cancellation for large float logits).
  // 16-bit vectors (kFused): the vector's sum w x, then one rebase, mm sw - sum w x: one
  // instruction less per element; its rounding, a few ulp(m) per vector, stays far below the
  // 2^-8 / 2^-11 rounding of the loss. The sums start from the first term (not from 0 + it).
  template <bool kFused, int N>
  __device__ __forceinline__ void push_linear(const A (&v)[N], const A (&w)[N]) {
    A sw = w[0];
#pragma unroll
    for (int i = 1; i < N; ++i) sw += w[i];
    if (kFused && N > 1) {
      A swx = w[0] * v[0];
#pragma unroll
      for (int i = 1; i < N; ++i) swx += w[i] * v[i];
      d += mm * sw - swx;
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) d += w[i] * (mm - v[i]);
    }
    u += sw;
  }
};

// p.d moved to the max m (>= p.m).
template <typename A>
__device__ __forceinline__ A rebased_d(const Stats<A>& p, A m) {
  return p.m == -INFINITY ? p.d : p.d + (m - p.m) * p.u;
}

// kLinear false: statistics without linear terms (a class-index walk without label smoothing
// leaves u = d = 0), merged and exchanged as (m, s) alone, u = d = 0.
template <bool kLinear = true, typename A>
__device__ __forceinline__ Stats<A> merge(const Stats<A>& p, const Stats<A>& q) {
  // Commutative bit for bit, so a butterfly gives every lane the same result.
  Stats<A> r{A(0), A(0), A(0), A(0)};
  r.m = fmax_(p.m, q.m);
  if (r.m == -INFINITY) {
    r.s = p.s + q.s;  // 0, or NaN
    if (kLinear) r.d = p.d + q.d;
  } else {
    // s_p e^(m_p - m) + s_q e^(m_q - m), where the side holding the max m takes e^0 = 1: one exp.
    // The same bits as both exps also where m is +inf (e^(inf - inf) = NaN there): a max of
    // +inf comes from a +inf logit, whose walk's s is already NaN (inf - inf in its exp).
    const bool p_max = p.m == r.m;
    const A e = fexp((p_max ? q.m : p.m) - r.m);
    r.s = p_max ? p.s + mul_rn(q.s, e) : mul_rn(p.s, e) + q.s;
    if (kLinear) r.d = rebased_d(p, r.m) + rebased_d(q, r.m);
  }
  if (kLinear) r.u = p.u + q.u;
  return r;
}

template <bool kLinear = true, typename A>
__device__ __forceinline__ Stats<A> warp_allreduce(Stats<A> v) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    Stats<A> q{A(0), A(0), A(0), A(0)};
    q.m = __shfl_xor_sync(0xffffffffu, v.m, o);
    q.s = __shfl_xor_sync(0xffffffffu, v.s, o);
    if (kLinear) {
      q.u = __shfl_xor_sync(0xffffffffu, v.u, o);
      q.d = __shfl_xor_sync(0xffffffffu, v.d, o);
    }
    v = merge<kLinear>(v, q);
  }
  return v;
}

// Every thread of the block gets the result; fixed order over the warps.
template <bool kLinear = true, typename A>
__device__ __forceinline__ Stats<A> block_allreduce(Stats<A> v, Stats<A>* smem /* 32 */) {
  v = warp_allreduce<kLinear>(v);
  __syncthreads();  // the previous row's readers are done with smem
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  Stats<A> r = smem[0];
  const int nw = blockDim.x >> 5;
  for (int w = 1; w < nw; ++w) r = merge<kLinear>(r, smem[w]);
  return r;
}

// ---- vector memory helpers ------------------------------------------------------------------
// Last read of a row: evict-first.
template <typename T>
__device__ __forceinline__ Vec<T> ld_vec_last(const T* p) {
  int4 r = __ldcs(reinterpret_cast<const int4*>(p));
  Vec<T> v;
  static_assert(sizeof(Vec<T>) == sizeof(int4), "16-byte vectors");
  memcpy(&v, &r, sizeof(r));
  return v;
}
template <typename T>
__device__ __forceinline__ void st_vec_stream(T* p, const Vec<T>& v) {
  int4 r;
  memcpy(&r, &v, sizeof(r));
  __stcs(reinterpret_cast<int4*>(p), r);
}

// The first N elements of a vector in acc_t. bf16 is the high half of a float: a 32-bit word of
// two is unpacked with one shift and one mask (a per-element conversion of the high half takes
// two instructions).
template <int N, typename T>
__device__ __forceinline__ void vec_to_acc(const Vec<T>& xv, acc_t<T> (&v)[N]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value && N % 2 == 0) {
    uint32_t u[N / 2];
    memcpy(u, &xv, sizeof(u));
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      const uint32_t lo = u[k] << 16, hi = u[k] & 0xffff0000u;
      memcpy(&v[2 * k], &lo, sizeof(lo));
      memcpy(&v[2 * k + 1], &hi, sizeof(hi));
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_acc(xv.v[i]);
  }
}

// The elementwise maximum of two pairs of 16-bit values (max.bf16x2 / max.f16x2 from sm_80: one
// HMNMX2). As fmaxf, a NaN lane takes the other operand's lane.
template <typename T>
__device__ __forceinline__ float pair_lane(uint32_t bits) {
  const uint16_t h = uint16_t(bits);
  T v;
  memcpy(&v, &h, sizeof(h));
  return to_acc(v);
}
template <typename T>
__device__ __forceinline__ uint32_t max_pairs(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  } else {
    asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  }
  return r;
#else
  uint32_t r = 0;
  for (int k = 0; k < 32; k += 16) {
    const float fa = pair_lane<T>(a >> k), fb = pair_lane<T>(b >> k);
    r |= ((fa != fa || fb > fa ? b : a) >> k & 0xffffu) << k;
  }
  return r;
#endif
}

// The largest of U vectors of 16-bit logits as float, as a chain of fmaxf gives it (NaN only if
// every one is NaN): packed pairwise maxima first, U V / 2 - 1 HMNMX2 and one FMNMX where the
// unpacked values took U V - 1 FMNMX. Exact: a maximum is one of its inputs. (Not for
// soft-capped logits: the softmax's max is then over the capped values.)
template <typename T, bool kCap>
constexpr bool kPackedMax = sizeof(T) == 2 && !kCap;
template <typename T, int U>
__device__ __forceinline__ float packed_max(const Vec<T>* xv) {
  constexpr int kWords = U * int(sizeof(Vec<T>)) / 4;
  uint32_t w[kWords];
  memcpy(w, xv, sizeof(w));
#pragma unroll
  for (int n = kWords / 2; n >= 1; n /= 2) {
#pragma unroll
    for (int i = 0; i < n; ++i) w[i] = max_pairs<T>(w[i], w[i + n]);
  }
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {  // as vec_to_acc: a shift and a mask
    const uint32_t lo = w[0] << 16, hi = w[0] & 0xffff0000u;
    float a, b;
    memcpy(&a, &lo, sizeof(a));
    memcpy(&b, &hi, sizeof(b));
    return fmaxf(a, b);
  }
  return fmaxf(pair_lane<T>(w[0]), pair_lane<T>(w[0] >> 16));
}

// Class weights of N consecutive classes c.. (acc_t, as the launcher passes them). kWeightAny:
// scalar loads, or 1 where there is no weight (checked per element); kWeightNone: 1;
// kWeightVec: 16-byte read-only loads (LDG.128.CONSTANT: 2 per bf16/fp16 vector, 1 per float or
// double vector) from a pointer vec_weights gave, so that weight + c is 16-byte aligned at every
// vector (the vector paths with class weights); kWeightScalar: scalar loads of a weight known
// to be given (no per-element test and select).
constexpr int kWeightAny = 0, kWeightNone = 1, kWeightVec = 2, kWeightScalar = 3;
template <int kW, int N, typename A>
__device__ __forceinline__ void load_weights(const A* weight, int64_t c, A (&w)[N]) {
  constexpr int kPerLoad = 16 / int(sizeof(A));
  if constexpr (kW == kWeightNone) {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = A(1);
  } else if constexpr (kW == kWeightVec && N % kPerLoad == 0) {
#pragma unroll
    for (int k = 0; k < N / kPerLoad; ++k) {
      const int4 r = __ldg(reinterpret_cast<const int4*>(weight + c) + k);
      memcpy(&w[k * kPerLoad], &r, sizeof(r));
    }
  } else if constexpr (kW == kWeightScalar) {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = weight[c + i];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) w[i] = weight != nullptr ? weight[c + i] : A(1);
  }
}

template <typename T>
struct CeParams {
  CrossEntropyArgs<T> a;
  acc_t<T> eps, eps_c;  // label smoothing, label smoothing / C
  double s_host;        // gradient scale not read from the device: 1, or 1/rows (probability mean)
  const acc_t<T>* W;    // device scalar: class-index mean denominator, else nullptr
  const acc_t<T>* Wsum; // device scalar: sum of the class weights, else nullptr (then C)
  acc_t<T>* row_loss;   // per-row losses for mean/sum
  acc_t<T>* split;      // split rows: rows x S partial Stats (m, s, u, d), then x_y per row
  acc_t<T> z;           // z-loss factor (0: off)
  acc_t<T> cap, inv_cap;  // soft-capping (used where the kernel's kCap is set)
  // Entry j: the class weights for vector walks whose vectors start at classes c = j modulo
  // 16 / sizeof(acc_t) (vec_weights): a.weight, or a copy with weight + c 16-byte aligned.
  const acc_t<T>* weight_at[4];
  bool fwd;             // forward op: compute the loss and lse
  int64_t rows;
};

// ---- per-element passes ---------------------------------------------------------------------
// Each functor: load<N>(c, xv, tv) then compute<N>(c, xv, tv) for N = 1 (scalar, element c at
// offset c*stride) or N = V (a vector of V consecutive classes, stride 1).

template <typename T, bool kSmooth, bool kCap, int kW = kWeightAny>
struct Pass1Index {  // class-index forward: online max/sum; sum of w_c (m - x_c) when smoothing
  using A = acc_t<T>;
  const T* x;
  const A* weight;
  int64_t stride;
  RunningStats<A> st;
  A cap, inv_cap;
  __device__ __forceinline__ Stats<A> stats() const {
    return st.template stats<kApproxExp<T>>();
  }
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>&) const {
    if (N == 1) xv.v[0] = x[c * stride];
    else xv = ld_vec(x + c);
  }
  // kShared: the N classes' weights given in `shared` (the vector column kernel loads them once
  // for its V positions).
  template <int N, bool kShared = false>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>&,
                                          const A* shared = nullptr) {
    A v[N];
    vec_to_acc<N>(xv, v);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = capped<kCap, kApproxExp<T>>(v[i], cap, inv_cap);
    if constexpr (kPackedMax<T, kCap> && N > 1 && !kShared) {  // (a gathered column: no gain)
      st.template push_max<kApproxExp<T>>(v, packed_max<T, 1>(&xv));
    } else {
      st.template push<kApproxExp<T>>(v);
    }
    if (kSmooth) {
      A w[N];
      if constexpr (kShared) {
#pragma unroll
        for (int i = 0; i < N; ++i) w[i] = shared[i];
      } else {
        load_weights<kW>(weight, c, w);
      }
      st.template push_linear<kApproxExp<T>>(v, w);
    }
  }
};

// kSmooth false (no label smoothing): t' = t, one instruction less per element.
template <typename T, bool kCap, int kW = kWeightAny, bool kSmooth = true>
struct Pass1Prob {  // probability target: online max/sum, sum w t' and sum w t' (m - x)
  using A = acc_t<T>;
  const T* x;
  const T* t;
  const A* weight;
  int64_t stride;
  A one_m_eps, eps_c;
  RunningStats<A> st;
  A cap, inv_cap;
  __device__ __forceinline__ Stats<A> stats() const {
    return st.template stats<kApproxExp<T>>();
  }
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>& tv) const {
    if (N == 1) {
      xv.v[0] = x[c * stride];
      tv.v[0] = t[c * stride];
    } else {
      xv = ld_vec(x + c);
      tv = ld_vec(t + c);
    }
  }
  // N logits xa and their weights w t' (targets ta, class weights w) into v[k..], wt[k..].
  template <int N, int M>
  __device__ __forceinline__ void terms(const A (&xa)[N], const A (&ta)[N], const A (&w)[N],
                                        int k, A (&v)[M], A (&wt)[M]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      wt[k + i] = w[i] * (kSmooth ? one_m_eps * ta[i] + eps_c : ta[i]);
      v[k + i] = capped<kCap, kApproxExp<T>>(xa[i], cap, inv_cap);
    }
  }
  template <int N, int M>
  __device__ __forceinline__ void unpack(int64_t c, const Vec<T>& xv, const Vec<T>& tv, int k,
                                         A (&v)[M], A (&wt)[M]) const {
    A w[N], ta[N], xa[N];
    load_weights<kW>(weight, c, w);
    vec_to_acc<N>(tv, ta);
    vec_to_acc<N>(xv, xa);
    terms<N>(xa, ta, w, k, v, wt);
  }
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>& tv) {
    A wt[N], v[N];
    unpack<N>(c, xv, tv, 0, v, wt);
    if constexpr (kPackedMax<T, kCap> && N > 1) {
      st.template push_max<kApproxExp<T>>(v, packed_max<T, 1>(&xv));
    } else {
      st.template push<kApproxExp<T>>(v);
    }
    st.template push_linear<kApproxExp<T>>(v, wt);
  }
  // The factors of t in w t' = w (1 - eps) t + w eps / C for N classes of weights w: wo =
  // w (1 - eps) and we = w eps / C (wo = w without smoothing), for compute_lane.
  template <int N>
  __device__ __forceinline__ void target_factors(const A (&w)[N], A (&wo)[N], A (&we)[N]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      wo[i] = kSmooth ? w[i] * one_m_eps : w[i];
      we[i] = kSmooth ? w[i] * eps_c : A(0);
    }
  }
  // The vector column kernel's N classes of one position, unpacked (xa, ta) from its V-position
  // vectors, the classes' target_factors taken once for the V positions (w t' in one FFMA per
  // element, not an FFMA and an FMUL), and (kPackedMax) vmax the largest of the xa from a packed
  // maximum over those vectors.
  template <int N>
  __device__ __forceinline__ void compute_lane(const A (&xa)[N], const A (&ta)[N],
                                               const A (&wo)[N], const A (&we)[N], A vmax) {
    A wt[N], v[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      wt[i] = kSmooth ? wo[i] * ta[i] + we[i] : wo[i] * ta[i];
      v[i] = capped<kCap, kApproxExp<T>>(xa[i], cap, inv_cap);
    }
    if constexpr (kPackedMax<T, kCap>) {
      st.template push_max<kApproxExp<T>>(v, vmax);
    } else {
      st.template push<kApproxExp<T>>(v);
    }
    st.template push_linear<kApproxExp<T>>(v, wt);
  }
  // walk's U unrolled vectors (classes c + u step) folded at once: one max and one rescale
  // check per U V logits instead of per V (~0.7 instruction per bf16 element).
  static constexpr bool kFoldsUnrolled = true;
  template <int U>
  __device__ __forceinline__ void compute_unrolled(int64_t c, int64_t step,
                                                   const Vec<T> (&xv)[U], const Vec<T> (&tv)[U]) {
    constexpr int V = VecTraits<T>::kVec;
    A wt[U * V], v[U * V];
#pragma unroll
    for (int u = 0; u < U; ++u) unpack<V>(c + u * step, xv[u], tv[u], u * V, v, wt);
    if constexpr (kPackedMax<T, kCap>) {
      st.template push_max<kApproxExp<T>>(v, packed_max<T, U>(xv));
    } else {
      st.template push<kApproxExp<T>>(v);
    }
    st.template push_linear<kApproxExp<T>>(v, wt);
  }
};

// Probability target: the row's loss sum_c w_c t'_c ((m - x_c) + log_s) term by term, as torch
// sums it. The split form d + u log_s of pass 1 makes inf * 0 = NaN where a target is infinite
// and its class holds the max (torch: inf); this pass runs only when that form is not finite.
template <typename T, bool kCap>
struct ProbLossTerms {
  using A = acc_t<T>;
  const T* x;
  const T* t;
  const A* weight;
  int64_t stride;
  A m, log_s, one_m_eps, eps_c, cap, inv_cap;
  A sum;
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>& tv) const {
    if (N == 1) {
      xv.v[0] = x[c * stride];
      tv.v[0] = t[c * stride];
    } else {
      xv = ld_vec(x + c);
      tv = ld_vec(t + c);
    }
  }
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>& tv) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const A wt =
          (weight != nullptr ? weight[c + i] : A(1)) * (one_m_eps * to_acc(tv.v[i]) + eps_c);
      sum += wt * ((m - capped<kCap, kApproxExp<T>>(to_acc(xv.v[i]), cap, inv_cap)) + log_s);
    }
  }
};

// softmax_c = exp((x_c - m) - log_s), m and log(s) kept apart.
// Class-index gradient: sg (wy' (softmax_c - [c == y]) + eps_c (W softmax_c - w_c)
// + zc softmax_c), exactly 0 for C = 1 without z-loss (zc = 2 z lse, the z-loss' gradient).
// The walk writes every class as if c != y, with the softmax's coefficient pc = wy' + zc; the
// thread that walked class y then rewrites it (index_grad, fix_target): no per-element compare
// with y.
template <typename T, bool kSmooth>
__device__ __forceinline__ acc_t<T> index_grad(acc_t<T> p, acc_t<T> pc, acc_t<T> wsum,
                                               acc_t<T> eps_c, acc_t<T> w, acc_t<T> sg) {
  acc_t<T> g = pc * p;
  if (kSmooth) g += eps_c * (wsum * p - w);
  return g * sg;
}

// Pass2Index's pc: with label smoothing NaN where sg is not finite, as torch's (its smoothing
// term sends sg eps_c w_c to every class, and its log-softmax backward takes softmax_c times
// their sum from each: inf - inf); without, the other classes keep sg pc p_c = +-inf.
template <bool kSmooth, typename A>
__device__ __forceinline__ A index_softmax_coef(A wy1, A zc, A sg) {
  return kSmooth ? nan_unless_finite(wy1 + zc, sg) : wy1 + zc;
}

template <typename T, bool kSmooth, bool kCap, int kW = kWeightAny>
struct Pass2Index {
  using A = acc_t<T>;
  const T* x;
  T* gi;
  const A* weight;
  int64_t stride;
  A m, log_s, ls2, wy1, wsum, eps_c, sg;  // wy1 = (1 - eps) w_y, ls2 = log_s log2(e)
  A pc, zc;                               // pc = wy1 + zc, zc = 2 z lse (0 without z-loss)
  A cap, inv_cap;
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>&) const {
    if (N == 1) xv.v[0] = x[c * stride];
    else xv = ld_vec_last(x + c);
  }
  // kShared: the N classes' weights given in `shared` (the vector column kernel loads them once
  // for its V positions).
  template <int N, bool kShared = false>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>&,
                                          const A* shared = nullptr) const {
    Vec<T> out;
    A w[N];
    if (kSmooth) {
      if constexpr (kShared) {
#pragma unroll
        for (int i = 0; i < N; ++i) w[i] = shared[i];
      } else {
        load_weights<kW>(weight, c, w);
      }
    }
    // 16-bit rows with smoothing: sg (pc p + eps_c (wsum p - w)) as p k1 - w k2, one FFMA (and
    // one FMUL with weights) per element; float and double keep index_grad's rounding.
    const A k1 = sg * (pc + eps_c * wsum), k2 = sg * eps_c;
    A xa[N];
    vec_to_acc<N>(xv, xa);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A dcap;
      const A xc = capped<kCap, kApproxExp<T>>(xa[i], cap, inv_cap, dcap);
      const A p = softmax_hot<kApproxExp<T>>(xc, m, log_s, ls2);
      A g = kSmooth && kApproxExp<T> ? p * k1 - w[i] * k2
                                     : index_grad<T, kSmooth>(p, pc, wsum, eps_c,
                                                              kSmooth ? w[i] : A(0), sg);
      if (kCap) g *= dcap;
      out.v[i] = from_acc<T>(g);
    }
    if (N == 1) gi[c * stride] = out.v[0];
    else st_vec_stream(gi + c, out);
  }
  // The target's element, by the thread that wrote it (so after its own store); xy is the
  // logit as loaded (not capped). NaN where sg or sg wy1 is not finite, as torch's (its
  // log-softmax backward takes sg wy1 p_y from sg wy1: inf - inf).
  __device__ __forceinline__ void fix_target(int64_t y, A xy) const {
    A dcap;
    const A p = softmax_hot<kApproxExp<T>>(capped<kCap, kApproxExp<T>>(xy, cap, inv_cap, dcap),
                                           m, log_s, ls2);
    const A w = kSmooth ? (weight != nullptr ? weight[y] : A(1)) : A(0);
    A g = wy1 * (p - A(1)) + zc * p;
    if (kSmooth) g += eps_c * (wsum * p - w);
    g = nan_unless_finite(nan_unless_finite(g * sg, sg), sg * wy1);
    if (kCap) g *= dcap;
    gi[y * stride] = from_acc<T>(g);
  }
};

// An ignored row's gradient is torch's 0 * softmax_c: NaN where the softmax is NaN, which needs
// a NaN or infinite logit, so the row's max or log-sum is not finite. Else zeros, written without
// reading the row (ignored_grad).
template <typename T>
__device__ __forceinline__ bool ignored_row_reads(acc_t<T> m, acc_t<T> log_s) {
  return !(isfinite(m) && isfinite(log_s));
}

template <typename T>
struct Pass2Zero {
  T* gi;
  int64_t stride;
  template <int N>
  __device__ __forceinline__ void load(int64_t, Vec<T>&, Vec<T>&) const {}
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>&, const Vec<T>&) const {
    Vec<T> out;
#pragma unroll
    for (int i = 0; i < N; ++i) out.v[i] = from_acc<T>(acc_t<T>(0));
    if (N == 1) gi[c * stride] = out.v[0];
    else st_vec_stream(gi + c, out);
  }
};

// Which form a row's probability pass 2 takes (Pass2Prob's kScaledExp): +1 where sg tw is
// positive and finite or +0, -1 where it is negative and finite or -0 (the exponent takes
// log2|sg tw|, the FFMA the negated exp: a free operand sign), 0 (the plain form, one FMUL more
// with weights) where it is inf or NaN, or the row has one class (softmax 1, the gradient
// torch's exact 0, which exp2(log2|sg tw|) - w (ka t + ke) would miss by a rounding). A zero
// (an all-zero target row without smoothing, a zero grad_output): log2(0) = -inf makes ls2
// +inf, and exp2 then gives +0 for every logit of a row with finite statistics, so the
// gradient is -w (ka t + ke) +- 0 with the plain form's bits (p (+-0) = +-0), and a NaN of a
// non-finite row stays NaN.
__device__ __forceinline__ int scaled_exp_sign(float sgtw, int64_t C) {
  if (!(fabsf(sgtw) <= FLT_MAX) || C <= 1) return 0;
  return copysignf(1.f, sgtw) > 0.f ? 1 : -1;
}

// kGI / kGT: which gradients are written (template flags: no per-element branch).
// kScaledExp (16-bit rows whose softmax coefficient sg tw is finite, scaled_exp_sign: its sign):
// the input gradient's sg tw softmax_c is +-one exp, exp2((x_c - m) log2(e) - ls2) with ls2 =
// log_s log2(e) - log2|sg tw|, so that the class weight's product goes into the FFMA
// that subtracts it: w (ka t + ke) from it in two FFMA (was FFMA, FMUL, FFMA). ls2's rounding
// (2^-24 of |log_s log2(e)| + |log2(sg tw)|, at most ~2^-17 for sg tw near FLT_MAX or its
// denormals) is a relative error of the softmax far below the output's 2^-8 / 2^-11.
template <typename T, bool kCap, bool kGI, bool kGT, int kW = kWeightAny, int kScaledExp = 0>
struct Pass2Prob {  // probability target gradients
  using A = acc_t<T>;
  static_assert(kScaledExp == 0 || (kApproxExp<T> && kGI), "kScaledExp: 16-bit input gradients");
  const T* x;
  const T* t;
  T* gi;
  T* gt;
  const A* weight;
  int64_t stride;
  // tw = sum w t' + 2 z lse (the z-loss' share of the softmax coefficient), ls2 = log_s log2(e)
  // (kScaledExp: less log2|sg tw|)
  A m, log_s, ls2, tw, one_m_eps, eps_c, sg;
  A cap, inv_cap;
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>& tv) const {
    if (N == 1) {
      xv.v[0] = x[c * stride];
      if (kGI) tv.v[0] = t[c * stride];
    } else {
      xv = ld_vec_last(x + c);
      if (kGI) tv = ld_vec_last(t + c);
    }
  }
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>& tv) const {
    A xa[N], ta[N];
    vec_to_acc<N>(xv, xa);
    if (kGI) vec_to_acc<N>(tv, ta);
    compute_acc<N>(c, xa, ta);
  }
  // The same from the logits and targets already in acc_t (the vector column kernel unpacks
  // each position's class from its V-position vectors: one shift or mask, lane_to_acc).
  template <int N>
  __device__ __forceinline__ void compute_acc(int64_t c, const A (&xa)[N], const A (&ta)[N]) const {
    Vec<T> oi, ot;
    A w[N];
    load_weights<kW>(weight, c, w);
    // ka w = sg (1 - eps) w: the target gradient's factor. float/double: sg (p tw - w t') keeps
    // its order (a one-class row's gradient is exactly 0). 16-bit rows: p (sg tw) - w (ka t + ke),
    // ke = sg eps_c: two FFMA per element without weights (was FFMA, FFMA, FMUL); its rounding,
    // a few ulp(sg p tw), stays far below the 2^-8 / 2^-11 of the gradient.
    const A ka = sg * one_m_eps, ke = sg * eps_c, sgtw = sg * tw;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A dcap;
      const A xc = capped<kCap, kApproxExp<T>>(xa[i], cap, inv_cap, dcap);
      const A xm = xc - m;
      const A kaw = ka * w[i];
      if (kGI) {
        const A p = softmax_hot<kApproxExp<T>>(xc, m, log_s, ls2);  // kScaledExp: |sg tw| p
        A g = kScaledExp      ? fma(-w[i], fma(ka, ta[i], ke), kScaledExp > 0 ? p : -p)
              : kApproxExp<T> ? p * sgtw - w[i] * (ka * ta[i] + ke)
                              : sg * (p * tw - w[i] * (one_m_eps * ta[i] + eps_c));
        if (kCap) g *= dcap;
        oi.v[i] = from_acc<T>(g);
      }
      if (kGT) {
        // 16-bit rows whose softmax coefficient is in the exponent (kScaledExp: sg finite):
        // w (ka log_s - ka (x - m)), one FFMA (both terms >= 0 times ka: no cancellation; ~1
        // ulp of float, far below the output's rounding) and, with class weights, one FMUL.
        // Else ka w (log_s - (x - m)), as torch: an infinite ka gives inf at the row's max
        // (x = m), where the FFMA gave -inf * 0 + inf = NaN.
        ot.v[i] = from_acc<T>(kScaledExp != 0 ? w[i] * fma(-ka, xm, ka * log_s)
                                              : kaw * (log_s - xm));
      }
    }
    if (N == 1) {
      if (kGI) gi[c * stride] = oi.v[0];
      if (kGT) gt[c * stride] = ot.v[0];
    } else {
      if (kGI) st_vec_stream(gi + c, oi);
      if (kGT) st_vec_stream(gt + c, ot);
    }
  }
};

// Walks classes [0, C) of one row: thread gt of a group of G threads. kVec: the row is split
// into a scalar head up to the first 16-byte boundary, whole vectors, and a scalar tail (the
// caller checked that every array has the same misalignment). U loads in flight per thread and
// array: class-index rows 4 x 16 B x 512 threads = 32 KB per SM even where one 512-thread block
// per SM runs (rows of 128K+ bf16 classes, grid capped by L2), as an H100/H200 needs;
// probability rows read two arrays, so 2 (more would spill at the register cap).
constexpr int kWalkUnrollIndex = 4;
constexpr int kWalkUnrollProb = 2;
// The longest row (or split slice) walk's vector path takes: its index c + U G V stays an int.
constexpr int64_t kVecWalkMaxC = (int64_t(1) << 31) - (int64_t(1) << 16);

// Whether a functor folds walk's U unrolled vectors in one call (compute_unrolled).
template <class F, class = void>
struct folds_unrolled : std::false_type {};
template <class F>
struct folds_unrolled<F, std::void_t<decltype(F::kFoldsUnrolled)>>
    : std::bool_constant<F::kFoldsUnrolled> {};

__device__ __forceinline__ int opaque_index(int i) {
#if defined(__CUDA_ARCH__)
  asm("" : "+r"(i));
#endif
  return i;
}
// kOpaquePartner: the probability block kernels' walks (G a runtime block size) address each
// unrolled vector from its own index (the warp kernels' partners are an immediate offset, and
// the class-index loops came out longer this way).
template <typename T, bool kVec, int U, bool kOpaquePartner = false, class F>
__device__ __forceinline__ void walk(F& f, int64_t C, int head, int gt, int G) {
  Vec<T> xv[U], tv[U];
  if (kVec) {
    constexpr int V = VecTraits<T>::kVec;
    if (gt < head) {
      f.template load<1>(gt, xv[0], tv[0]);
      f.template compute<1>(gt, xv[0], tv[0]);
    }
    // Vector j of the thread starts at class head + j V; walked by a 32-bit class index (the
    // launchers take the vector path only for C <= kVecWalkMaxC): each address is one IMAD.WIDE
    // from the row pointer, where a 64-bit index cost ~1.5 more integer instructions per 16 B.
    // Double rows keep 64 bits: with 32, ptxas held the f64 split and cluster kernels to 64
    // registers and they spilled 300-400 B in their loops.
    using Index = typename std::conditional<sizeof(T) == 8, int64_t, int>::type;
    const Index end = head + Index(C - head) / V * V;  // past the last whole vector
    const Index GV = Index(G) * V;
    Index c = head + Index(gt) * V;
    for (; c + (U - 1) * GV < end; c += U * GV) {
      if constexpr (kOpaquePartner && sizeof(Index) == 4) {
        // The unrolled partners' indices hidden from the optimizer: each address one
        // IMAD.WIDE from the row pointer instead of a 64-bit add of G V elements to the first.
        Index cu[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          cu[u] = u == 0 ? c : opaque_index(c + u * GV);
          f.template load<V>(cu[u], xv[u], tv[u]);
        }
        if constexpr (folds_unrolled<F>::value) {
          f.template compute_unrolled<U>(c, GV, xv, tv);
        } else {
#pragma unroll
          for (int u = 0; u < U; ++u) f.template compute<V>(cu[u], xv[u], tv[u]);
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; ++u) f.template load<V>(c + u * GV, xv[u], tv[u]);
        if constexpr (folds_unrolled<F>::value) {
          f.template compute_unrolled<U>(c, GV, xv, tv);
        } else {
#pragma unroll
          for (int u = 0; u < U; ++u) f.template compute<V>(c + u * GV, xv[u], tv[u]);
        }
      }
    }
    for (; c < end; c += GV) {
      f.template load<V>(c, xv[0], tv[0]);
      f.template compute<V>(c, xv[0], tv[0]);
    }
    const int64_t ct = end + gt;
    if (ct < C) {
      f.template load<1>(ct, xv[0], tv[0]);
      f.template compute<1>(ct, xv[0], tv[0]);
    }
  } else {
    int64_t c = gt;
    for (; c + (U - 1) * int64_t(G) < C; c += U * int64_t(G)) {
#pragma unroll
      for (int u = 0; u < U; ++u) f.template load<1>(c + u * G, xv[u], tv[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) f.template compute<1>(c + u * G, xv[u], tv[u]);
    }
    for (; c < C; c += G) {
      f.template load<1>(c, xv[0], tv[0]);
      f.template compute<1>(c, xv[0], tv[0]);
    }
  }
}

// The thread gt of walk<T, kVec>(..., C, head, gt, G) that visits class c.
template <typename T, bool kVec>
__device__ __forceinline__ int walk_owner(int64_t c, int64_t C, int head, int G) {
  if (!kVec) return int(c % G);
  // 32-bit: the vector path's rows are shorter than kVecWalkMaxC (launch_main, split slices).
  constexpr int V = VecTraits<T>::kVec;
  const int ci = int(c), Ci = int(C);
  if (ci < head) return ci;
  const int nv = (Ci - head) / V;
  const int j = (ci - head) / V;
  if (j < nv) return j % G;
  return ci - head - nv * V;  // the scalar tail
}

// Short rows held in registers (ce_row with K > 0: a forward that writes the gradient, class
// index, vector path): each thread loads its whole share of the row once, all K vectors in
// flight plus its scalar head and tail element, and both passes compute from those registers
// in walk's order, so the statistics and gradients are walk's bit for bit, without pass 2's
// re-read. The raw loaded logits are kept (each pass caps them itself, as walk's do). Needs
// (C - head) / V <= K G (launch_main); int indices (such rows are short). Class-index functors
// only: no target vector (the logit vector is passed in its place, unread).
template <typename T, int K>
struct RowCache {
  Vec<T> xv[K > 0 ? K : 1];
  Vec<T> xh, xt;  // the thread's scalar head and tail element, in v[0]
  __device__ __forceinline__ void load(const T* x, int64_t C, int head, int gt, int G) {
    constexpr int V = VecTraits<T>::kVec;
    const int end = head + (int(C) - head) / V * V;
    if (gt < head) xh.v[0] = x[gt];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int c = head + (j * G + gt) * V;
      if (c < end) xv[j] = ld_vec_last(x + c);  // the row's only read: evict-first
    }
    if (end + gt < C) xt.v[0] = x[end + gt];
  }
  template <class F>
  __device__ __forceinline__ void walk(F& f, int64_t C, int head, int gt, int G) const {
    constexpr int V = VecTraits<T>::kVec;
    const int end = head + (int(C) - head) / V * V;
    if (gt < head) f.template compute<1>(gt, xh, xh);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int c = head + (j * G + gt) * V;
      if (c < end) f.template compute<V>(c, xv[j], xv[j]);
    }
    if (end + gt < C) f.template compute<1>(end + gt, xt, xt);
  }
};

// Vectors per thread of a cached row (4 K registers): K x 16 B in flight per thread, 64 KB per
// SM at the 1024 threads of the 64-register cap. K = 8 spilled 100-400 bytes there.
constexpr int kRowCacheVectors = 4;

// walk<T, kVec, U>, or (K > 0) the same walk over the row cached in registers.
template <typename T, bool kVec, int U, int K, class F>
__device__ __forceinline__ void walk_row(F& f, const RowCache<T, K>& cache, int64_t C, int head,
                                         int gt, int G) {
  if constexpr (K > 0) cache.walk(f, C, head, gt, G);
  else walk<T, kVec, U>(f, C, head, gt, G);
}

// Group reductions: kGroup == 32: a warp per row; 0: the whole block per row; 1: one thread.
template <int kGroup, bool kLinear = true, typename A>
__device__ __forceinline__ Stats<A> group_allreduce(const Stats<A>& v, Stats<A>* smem) {
  if (kGroup == 1) return v;
  if (kGroup == 32) {
    const Stats<A> r = warp_allreduce<kLinear>(v);
    // Shuffles exchange registers but do not order memory: the leader's read of x[y] must
    // happen before the other lanes write the gradient over it (in-place).
    __syncwarp();
    return r;
  }
  return block_allreduce<kLinear>(v, smem);  // its __syncthreads order the same
}

// Sum over the group (kGroup as in group_allreduce); the result is valid in its thread 0.
template <int kGroup, typename A>
__device__ __forceinline__ A group_sum(A v, A* smem /* >= 32 */) {
  if (kGroup == 1) return v;
  if (kGroup == 32) return warp_sum(v);
  return block_sum(v, smem);
}

// A row (or slice) whose max m is beyond the fold's range (needs_unfolded_sum): its sum of exp
// taken again unfolded by the group's threads, over the classes first, first + step, ... < n
// (at c * stride); the sum in every thread. Cold (not inlined into the walks' kernels); m is the
// same in every thread of the group.
template <int kGroup, bool kCap, typename T, typename A>
__device__ __noinline__ A sum_exp_unfolded(const T* x, int64_t stride, int64_t n, int first,
                                           int step, A m, A cap, A inv_cap, Stats<A>* smem) {
  A s = 0;
  for (int64_t c = first; c < n; c += step) {
    s += fexp(capped<kCap, kApproxExp<T>>(to_acc(x[c * stride]), cap, inv_cap) - m);
  }
  return group_allreduce<kGroup, false>(Stats<A>{m, s, A(0), A(0)}, smem).s;
}

// Gradient scale: 1/W (device) for class-index mean, else s_host; times grad_output. A mean over
// a zero total weight is torch's 0 / 0 = NaN (its nll part), label smoothing or not: every
// gradient of a row that is not ignored. Formed in double and rounded once, as the CPU backend
// does (a float 1/W times grad_output rounds twice): once per row, never per element.
template <typename T>
__device__ __forceinline__ acc_t<T> grad_scale(const CeParams<T>& P, int64_t row) {
  double sg = P.s_host;
  if (P.W != nullptr) sg = *P.W == acc_t<T>(0) ? double(NAN) : 1.0 / double(*P.W);
  if (P.a.grad_output != nullptr) {
    sg *= double(to_acc(P.a.grad_output_scalar ? P.a.grad_output[0] : P.a.grad_output[row]));
  }
  return acc_t<T>(sg);
}

// grad_scale where it is the same for every row (no per-row grad_output), formed once per thread
// before the row kernel's loop over rows: the double reciprocal of W is ~25 instructions, which
// short rows paid per row. One float held through the loop; a per-row grad_output (reduction
// 'none', no W) reads its row's. (The column kernel keeps grad_scale per row: holding the value
// spilled its double instances.)
template <typename T>
struct RowGradScale {
  acc_t<T> uniform;
  __device__ __forceinline__ static bool per_row(const CeParams<T>& P) {
    return P.a.grad_output != nullptr && !P.a.grad_output_scalar;
  }
  __device__ __forceinline__ explicit RowGradScale(const CeParams<T>& P)
      : uniform(per_row(P) ? acc_t<T>(0) : grad_scale(P, 0)) {}
  __device__ __forceinline__ acc_t<T> operator()(const CeParams<T>& P, int64_t row) const {
    return per_row(P) ? grad_scale(P, row) : uniform;
  }
};
struct GradScaleEachRow {
  template <typename T>
  __device__ __forceinline__ acc_t<T> operator()(const CeParams<T>& P, int64_t row) const {
    return grad_scale(P, row);
  }
};

// A backward op's row statistics, saved by the forward (CrossEntropyArgs::row_stats): plane k
// of row `row`.
template <typename T>
__device__ __forceinline__ acc_t<T> saved_stat(const CeParams<T>& P, int k, int64_t row) {
  return P.a.row_stats[k * P.rows + row];
}

// The class weights for a vector walk whose vectors start at class c (mod V): a pointer w with
// w[k] the weight of class k and w + c 16-byte aligned, a.weight itself or a shifted copy
// (launch_cross_entropy makes the copies where some walk needs one). kWeightVec loads from here.
template <typename T>
__device__ __forceinline__ const acc_t<T>* vec_weights(const CeParams<T>& P, int64_t c) {
  return P.weight_at[c & (16 / sizeof(acc_t<T>) - 1)];
}

// Leading scalar elements of a row from p up to a 16-byte boundary (at most len).
template <typename T, bool kVec>
__device__ __forceinline__ int vec_head(const T* p, int64_t len) {
  if (!kVec) return 0;
  const int head = int(((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15) / sizeof(T));
  return head > len ? int(len) : head;
}

// A row's base pointer, opaque to the optimizer: otherwise it folds the row offset into each
// element's index (base + (row offset + c) x size: 3-4 integer instructions per 16-byte load
// and store in the hot loops) instead of keeping the row pointer (2). Emits no instruction.
template <typename P>
__device__ __forceinline__ P* opaque_row(P* p) {
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(p));
  __builtin_assume(__isGlobal(p));  // still global memory: LDG, not generic loads
#endif
  return p;
}

// Offsets of one row's class 0: in the input, a probability target and the gradients.
struct RowBase {
  int64_t x, t, g;
};

// Row (n, d) in the row kernel's layout (launchers.h, CrossEntropyArgs::x_stride_n): the input
// and a probability target by their strides, the gradients dense in (n, d, c) order.
template <typename T>
__device__ __forceinline__ RowBase row_base(const CrossEntropyArgs<T>& a, int64_t row) {
  const int64_t n = a.D == 1 ? row : row / a.D, d = row - n * a.D;
  return {n * a.x_stride_n + d * a.x_stride_d, n * a.t_stride_n + d * a.t_stride_d, row * a.C};
}

// One row: element c of the input at rb.x + c * stride (stride = D in the column kernel, 1 in
// the row kernel), of the target at rb.t + c * stride, of the gradients at rb.g + c * stride.
// kW: how the smoothing and probability passes load class weights (load_weights), one mode per
// kernel (a per-row choice between loop variants costs the 64-register kernels spills).
// K > 0 (class index, kVec, forward writing the gradient): the row held in registers (RowCache).
// scale(P, row): the row's grad_scale (RowGradScale, GradScaleEachRow).
template <typename T, bool kProb, bool kVec, int kGroup, bool kCap, int kW, int K = 0,
          class Scale>
__device__ __forceinline__ void ce_row(const CeParams<T>& P, int64_t row, RowBase rb,
                                       int64_t stride, int gt, int G, Stats<acc_t<T>>* smem,
                                       const Scale& scale) {
  using A = acc_t<T>;
  // The vector path loads class weights as vectors (vec_weights) or has none (launch_main).
  static_assert(!kVec || kW != kWeightAny, "vector rows: kWeightNone or kWeightVec");
  const CrossEntropyArgs<T>& a = P.a;
  const int64_t C = a.C;
  const T* xr = opaque_row(a.input + rb.x);
  const T* tr = kProb ? opaque_row(a.target_prob + rb.t) : nullptr;
  T* gir = a.grad_input != nullptr ? opaque_row(a.grad_input + rb.g) : nullptr;
  T* gtr = a.grad_target != nullptr ? opaque_row(a.grad_target + rb.g) : nullptr;
  const bool leader = gt == 0;
  const int head = vec_head<T, kVec>(xr, C);
  const A* wr = kVec ? vec_weights(P, head) : a.weight;  // read class by class (kW)
  const A sg = scale(P, row);
  // Loads in flight per thread (see walk); the column kernel's one thread per row keeps 2.
  constexpr int kUnrollIndex = kGroup == 1 ? kWalkUnrollProb : kWalkUnrollIndex;
  // Smoothing passes with 16-byte class weights: 2 more loads per logit vector (bf16/fp16), so
  // half the unroll (the same bytes in flight, no spills at the 64-register cap).
  constexpr int kUnrollSmooth = kW == kWeightVec ? kWalkUnrollProb : kUnrollIndex;
  const A one_m_eps = A(1) - P.eps;
  Stats<A> st{A(-INFINITY), A(0), A(0), A(0)};
  // The row's max and log(sum of exp(x - max)).
  A m, log_s;

  if (!kProb) {
    const int64_t y = a.target_index[row];
    const bool ignored = y == a.ignore_index;
    if (!ignored) TL_DEVICE_ASSERT(y >= 0 && y < C, TL_CE_TARGET_CHECK);
    const A wy = ignored ? A(0) : (a.weight != nullptr ? a.weight[y] : A(1));
    // The thread that walks class y fixes its gradient up; it reads x_y before its own pass 2
    // writes it (in place, no other thread writes element y).
    const bool owns_y = !ignored && a.grad_input != nullptr &&
                        gt == walk_owner<T, kVec>(y, C, head, G);
    const A xy_own = owns_y ? to_acc(xr[y * stride]) : A(0);
    A xy = 0;
    if (P.fwd && leader && !ignored) {  // before any gradient write
      xy = capped<kCap, kApproxExp<T>>(to_acc(xr[y * stride]), P.cap, P.inv_cap);
    }
    RowCache<T, K> cache;
    if constexpr (K > 0) cache.load(xr, C, head, gt, G);  // K > 0: forward only (launch_main)
    if (P.fwd) {
      if (P.eps != A(0)) {
        Pass1Index<T, true, kCap, kW> f{xr, wr, stride, {}, P.cap, P.inv_cap};
        walk_row<T, kVec, kUnrollSmooth, K>(f, cache, C, head, gt, G);
        st = group_allreduce<kGroup>(f.stats(), smem);
      } else {
        Pass1Index<T, false, kCap> f{xr, a.weight, stride, {}, P.cap, P.inv_cap};
        walk_row<T, kVec, kUnrollIndex, K>(f, cache, C, head, gt, G);
        st = group_allreduce<kGroup, false>(f.stats(), smem);
      }
      if (needs_unfolded_sum(st.m)) {
        st.s = sum_exp_unfolded<kGroup, kCap>(xr, stride, C, gt, G, st.m, P.cap, P.inv_cap, smem);
      }
      m = st.m;
      log_s = flog(st.s);
    } else {  // backward: the saved statistics, pass 2 only
      m = saved_stat(P, 0, row);
      log_s = saved_stat(P, 1, row);
    }
    if (P.fwd && leader) {
      a.row_stats[row] = m;
      a.row_stats[P.rows + row] = log_s;
      A l = 0;
      if (!ignored) {
        // -log_softmax_y = (m - x_y) + log_s; the smoothing term sum_c w_c (lse - x_c) =
        // d + (sum_c w_c) log_s.
        l = one_m_eps * wy * ((m - xy) + log_s);
        if (P.eps != A(0)) l += P.eps_c * (st.d + st.u * log_s);
        if (P.z != A(0)) l += P.z * (m + log_s) * (m + log_s);
      }
      if (a.reduction == 0) a.loss[row] = from_acc<T>(l);
      else P.row_loss[row] = l;
    }
    if (a.grad_input != nullptr) {
      if (ignored && ignored_row_reads<T>(m, log_s)) {
        Pass2Index<T, false, kCap> f{xr, gir, nullptr, stride, m, log_s, log_s * A(kLog2e), A(0),
                                     A(0), A(0), A(1), A(0), A(0), P.cap, P.inv_cap};
        walk_row<T, kVec, kUnrollIndex, K>(f, cache, C, head, gt, G);
      } else if (ignored) {
        Pass2Zero<T> f{gir, stride};
        walk_row<T, kVec, kUnrollIndex, K>(f, cache, C, head, gt, G);
      } else {
        const A wsum = P.Wsum != nullptr ? *P.Wsum : A(C);
        const A ls2 = log_s * A(kLog2e);
        const A wy1 = one_m_eps * wy;
        const A zc = A(2) * P.z * (m + log_s);
        if (P.eps_c != A(0)) {
          Pass2Index<T, true, kCap, kW> f{xr, gir, wr, stride, m, log_s, ls2, wy1, wsum,
                                          P.eps_c, sg, index_softmax_coef<true>(wy1, zc, sg),
                                          zc, P.cap, P.inv_cap};
          walk_row<T, kVec, kUnrollSmooth, K>(f, cache, C, head, gt, G);
          if (owns_y) f.fix_target(y, xy_own);
        } else {
          Pass2Index<T, false, kCap> f{xr, gir, a.weight, stride, m, log_s, ls2, wy1, wsum,
                                       P.eps_c, sg, wy1 + zc, zc, P.cap, P.inv_cap};
          walk_row<T, kVec, kUnrollIndex, K>(f, cache, C, head, gt, G);
          if (owns_y) f.fix_target(y, xy_own);
        }
      }
    }
  } else {
    if (P.fwd) {
      auto pass1 = [&](auto smooth) {
        Pass1Prob<T, kCap, kW, decltype(smooth)::value> f{xr, tr, wr, stride, one_m_eps,
                                                           P.eps_c, {}, P.cap, P.inv_cap};
        walk<T, kVec, kWalkUnrollProb, kGroup == 0>(f, C, head, gt, G);
        return f.stats();
      };
      st = group_allreduce<kGroup>(
          P.eps != A(0) ? pass1(std::true_type{}) : pass1(std::false_type{}), smem);
      if (needs_unfolded_sum(st.m)) {
        st.s = sum_exp_unfolded<kGroup, kCap>(xr, stride, C, gt, G, st.m, P.cap, P.inv_cap, smem);
      }
      m = st.m;
      log_s = flog(st.s);
    } else {  // backward: the saved statistics, pass 2 only
      m = saved_stat(P, 0, row);
      log_s = saved_stat(P, 1, row);
      st.u = saved_stat(P, 2, row);
    }
    if (P.fwd) {
      A l = st.d + st.u * log_s;  // sum_c w_c t'_c ((m - x_c) + log_s)
      if (!isfinite(l)) {  // the same in every thread of the group (st is)
        ProbLossTerms<T, kCap> terms{xr, tr, wr, stride, m, log_s, one_m_eps, P.eps_c,
                                     P.cap, P.inv_cap, A(0)};
        walk<T, kVec, kWalkUnrollProb>(terms, C, head, gt, G);
        l = group_sum<kGroup>(terms.sum, reinterpret_cast<A*>(smem));
      }
      if (P.z != A(0)) l += P.z * (m + log_s) * (m + log_s);
      if (leader) {
        a.row_stats[row] = m;
        a.row_stats[P.rows + row] = log_s;
        a.row_stats[2 * P.rows + row] = st.u;
        if (a.reduction == 0) a.loss[row] = from_acc<T>(l);
        else P.row_loss[row] = l;
      }
    }
    const A tw = prob_softmax_coef(st.u + A(2) * P.z * (m + log_s), sg);
    auto pass2 = [&](auto gi_flag, auto gt_flag) {
      constexpr bool kGI = decltype(gi_flag)::value, kGT = decltype(gt_flag)::value;
      const A ls2 = log_s * A(kLog2e);
      auto run = [&](auto sign, A ls2_run) {
        Pass2Prob<T, kCap, kGI, kGT, kW, decltype(sign)::value> f{
            xr, tr, gir, gtr, wr, stride, m, log_s, ls2_run, tw, one_m_eps,
            P.eps_c, sg, P.cap, P.inv_cap};
        walk<T, kVec, kWalkUnrollProb, kGroup == 0>(f, C, head, gt, G);
      };
      if constexpr (kApproxExp<T> && kGI && kW == kWeightVec) {  // no gain without weights
        const A sgtw = sg * tw;
        const int sign = scaled_exp_sign(sgtw, C);
        if (sign > 0) return run(std::integral_constant<int, 1>{}, ls2 - log2f(sgtw));
        if (sign < 0) return run(std::integral_constant<int, -1>{}, ls2 - log2f(-sgtw));
      }
      run(std::integral_constant<int, 0>{}, ls2);
    };
    if (gir != nullptr && gtr != nullptr) pass2(std::true_type{}, std::true_type{});
    else if (gir != nullptr) pass2(std::true_type{}, std::false_type{});
    else if (gtr != nullptr) pass2(std::false_type{}, std::true_type{});
  }
}

// A backward into the forward's gradient buffers with a scalar grad_output of exactly 1 (read
// on the device, no host sync): those buffers already hold the gradient (issue 13).
template <typename T>
__device__ __forceinline__ bool skip_backward(const CrossEntropyArgs<T>& a) {
  return a.skip_if_grad_output_is_one && to_acc(a.grad_output[0]) == acc_t<T>(1);
}

// D == 1: a warp (kGroup 32) or the block (kGroup 0) per row; rows in a grid-stride loop.
// The hot class-index kernels are capped at 64 registers (2 blocks of 512 threads per SM: enough
// loads in flight); the probability-target and double ones get 128 (no spills), except the
// 16-bit probability warp kernels without soft-capping or 16-byte weights: 80, i.e. 3 blocks of
// 256 threads per SM (the warp kernels run 256-thread blocks, launch_main).
template <bool kProb, int kGroup, bool kCap, int kW, int kSize>
constexpr int row_kernel_min_blocks() {
  if (kGroup != 32) return (kProb || kSize == 8) ? 1 : 2;
  if (kProb && kSize == 2 && !kCap && kW != kWeightVec) return 3;
  return (kProb || kSize == 8) ? 2 : 4;
}
template <typename T, bool kProb, bool kVec, int kGroup, bool kCap, int kW, int K = 0>
__global__ void __launch_bounds__(kGroup == 32 ? 256 : 512,
                                  row_kernel_min_blocks<kProb, kGroup, kCap, kW, sizeof(T)>())
    ce_row_kernel(const CeParams<T> P) {
  if (skip_backward(P.a)) return;  // issue 13: the forward's buffer already holds it
  __shared__ Stats<acc_t<T>> smem[32];
  const int G = kGroup == 32 ? 32 : blockDim.x;
  const int gt = kGroup == 32 ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t groups_per_block = blockDim.x / G;
  const int64_t first = int64_t(blockIdx.x) * groups_per_block + threadIdx.x / G;
  const int64_t step = int64_t(gridDim.x) * groups_per_block;
  const RowGradScale<T> gs(P);
  for (int64_t row = first; row < P.rows; row += step) {
    ce_row<T, kProb, kVec, kGroup, kCap, kW, K>(P, row, row_base(P.a, row), 1, gt, G, smem, gs);
  }
}

// One thread per position (n, d): coalesced over d for the contiguous (N, C, D), D > 1; also
// the rows_strided layout's rows of few classes.
template <typename T, bool kProb, bool kCap>
__global__ void __launch_bounds__(256) ce_column_kernel(const CeParams<T> P) {
  if (skip_backward(P.a)) return;  // issue 13
  const int64_t D = P.a.D;
  const int64_t CD = P.a.C * D;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < P.rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    if (P.a.rows_strided) {
      ce_row<T, kProb, false, 1, kCap, kWeightAny>(P, row, row_base(P.a, row), 1, 0, 1, nullptr,
                                                   GradScaleEachRow{});
    } else {
      const int64_t n = row / D, d = row - n * D;
      const int64_t base = n * CD + d;
      ce_row<T, kProb, false, 1, kCap, kWeightAny>(P, row, RowBase{base, base, base}, D, 0, 1,
                                                   nullptr, GradScaleEachRow{});
    }
  }
}

// ---- D > 1 vectorized across d ----------------------------------------------------------------
// The contiguous (N, C, D) with D % V == 0 and 16-byte aligned arrays (launch_main decides; else
// the column kernel): one thread owns V consecutive positions (n, d0 .. d0 + V - 1), which share
// every class's 16-byte vector x[n, c, d0 .. d0 + V - 1]. Pass 1 loads V classes at once (V
// vectors) and gives each lane i its V classes as one vector (element i of each), so that the
// row functors' compute<V> runs the row kernel's arithmetic per position (one max and one
// rescale check per V classes, not per element); the last C % V classes likewise, in chunks of
// V / 2, ..., 1 classes (compute<N>).
// The column kernel folds one class at a time, so the two kernels round the statistics
// differently (both are tested against torch). Pass 2 is elementwise: each lane calls the
// functors' compute<1> on its element, the V gradients of a class written with one 16-byte
// store (the functors write into a register vector). Smoothing's class weights are loaded once
// per class for the V lanes and handed to their compute (kShared).

// Lane i of a loaded vector as a one-element Vec (what compute<1> reads).
template <typename T>
__device__ __forceinline__ Vec<T> lane_of(const Vec<T>& v, int i) {
  Vec<T> r;
  r.v[0] = v.v[i];
  return r;
}

// Lane i of the first N of V vectors (N consecutive classes of one position) as one Vec, in its
// first N elements (what compute<N> reads).
template <typename T, int N>
__device__ __forceinline__ Vec<T> lane_gather(const Vec<T> (&v)[VecTraits<T>::kVec], int i) {
  Vec<T> r;
#pragma unroll
  for (int k = 0; k < N; ++k) r.v[k] = v[k].v[i];
  return r;
}

// Lane i of a vector in acc_t (bf16: one shift or mask of its 32-bit word, as vec_to_acc).
template <typename T>
__device__ __forceinline__ acc_t<T> lane_to_acc(const Vec<T>& v, int i) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    uint32_t u;
    memcpy(&u, &v.v[i & ~1], sizeof(u));
    u = (i & 1) ? (u & 0xffff0000u) : (u << 16);
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
  } else {
    return to_acc(v.v[i]);
  }
}

// The elementwise maximum of the first N of V vectors of 16-bit values (each position's largest
// over N classes), in packed pairs (max_pairs: fmaxf's NaN rule).
template <typename T, int N>
__device__ __forceinline__ Vec<T> lanes_max(const Vec<T> (&v)[VecTraits<T>::kVec]) {
  constexpr int kWords = int(sizeof(Vec<T>)) / 4;
  uint32_t r[kWords];
  memcpy(r, &v[0], sizeof(r));
#pragma unroll
  for (int k = 1; k < N; ++k) {
    uint32_t w[kWords];
    memcpy(w, &v[k], sizeof(w));
#pragma unroll
    for (int j = 0; j < kWords; ++j) r[j] = max_pairs<T>(r[j], w[j]);
  }
  Vec<T> out;
  memcpy(&out, r, sizeof(r));
  return out;
}

// The last r < V classes c.. of lanes_walk_chunks (o = c D), in straight-line chunks of N, N / 2,
// ..., 1 classes, those whose bit is set in r.
template <typename T, bool kT, int N, class Chunk>
__device__ __forceinline__ void lanes_walk_tail(const T* x, const T* t, int r, int c, int o,
                                                int D, Vec<T> (&xv)[VecTraits<T>::kVec],
                                                Vec<T> (&tv)[VecTraits<T>::kVec], Chunk& chunk) {
  if constexpr (N >= 1) {
    if (r & N) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        xv[k] = ld_vec(x + (o + k * D));
        if (kT) tv[k] = ld_vec(t + (o + k * D));
      }
      chunk(std::integral_constant<int, N>{}, c, xv, tv);
      c += N;
      o += N * D;
    }
    lanes_walk_tail<T, kT, N / 2>(x, t, r, c, o, D, xv, tv, chunk);
  }
}

// Classes 0 .. C-1 of V positions in chunks of N classes: the N vectors at x + (c + k) D (and
// t + (c + k) D where kT) loaded at once, then chunk(n, c, xv, tv), n the integral_constant N,
// the vectors xv[0 .. N-1]. N = V but for the last C % V classes (lanes_walk_tail: one max and
// rescale check per chunk there too, not per class). Pass 1 only (never the row's last read).
// Offsets c D are 32-bit (one IMAD.WIDE per vector, not a 64-bit multiply), at most C D (the
// loops test c before stepping o): the vector column kernel runs where C D fits an int
// (ce_layout.h, ce_column_vec_fits).
template <typename T, bool kT, class Chunk>
__device__ __forceinline__ void lanes_walk_chunks(const T* x, const T* t, int C, int D,
                                                  Chunk&& chunk) {
  constexpr int V = VecTraits<T>::kVec;
  Vec<T> xv[V], tv[V];
  int c = 0, o = 0;  // o = c D
  for (; c + V <= C; c += V, o += V * D) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      xv[k] = ld_vec(x + (o + k * D));
      if (kT) tv[k] = ld_vec(t + (o + k * D));
    }
    chunk(std::integral_constant<int, V>{}, c, xv, tv);
  }
  lanes_walk_tail<T, kT, V / 2>(x, t, C - c, c, o, D, xv, tv, chunk);
}

// Classes 0 .. C-1 of V positions, pass 2: the vectors at x + c D (and t + c D where kT), U
// loads in flight per array, then step(c, c D, xv, tv) in class order; the row's last read
// (evict-first). 32-bit offsets as lanes_walk_chunks.
template <typename T, bool kT, int U, class Step>
__device__ __forceinline__ void lanes_walk(const T* x, const T* t, int C, int D, Step&& step) {
  Vec<T> xv[U], tv[U];
  int c = 0, o = 0;  // o = c D
  for (; c + U <= C; c += U, o += U * D) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      xv[u] = ld_vec_last(x + (o + u * D));
      if (kT) tv[u] = ld_vec_last(t + (o + u * D));
    }
#pragma unroll
    for (int u = 0; u < U; ++u) step(c + u, o + u * D, xv[u], tv[u]);
  }
  for (; c < C; ++c, o += D) {
    xv[0] = ld_vec_last(x + o);
    if (kT) tv[0] = ld_vec_last(t + o);
    step(c, o, xv[0], tv[0]);
  }
}

// A class-weight mode (load_weights) as a type: the lambdas below take it as a template flag.
template <int kW>
using WeightMode = std::integral_constant<int, kW>;

// ce_row (kGroup 1, scalar walk) for the V positions row0 .. row0 + V - 1, whose
// class 0 is at offset `base` of every (N, C, D) array.
template <typename T, bool kProb, bool kCap>
__device__ __forceinline__ void ce_lanes(const CeParams<T>& P, int64_t row0, int64_t base) {
  using A = acc_t<T>;
  constexpr int V = VecTraits<T>::kVec;
  // Pass 2's 16-byte loads in flight per thread and array (pass 1 loads V at once): 4 for
  // 16-bit logits alone, else 2 (4 would spill float and double rows).
  constexpr int U = (kProb || sizeof(T) > 2) ? kWalkUnrollProb : kWalkUnrollIndex;
  const CrossEntropyArgs<T>& a = P.a;
  const int64_t C = a.C, D = a.D;
  const int Ci = int(C), Di = int(D);  // lanes_walk's 32-bit offsets (ce_column_vec_fits)
  const T* xr = opaque_row(a.input + base);
  const T* tr = kProb ? opaque_row(a.target_prob + base) : nullptr;
  T* gir = a.grad_input != nullptr ? opaque_row(a.grad_input + base) : nullptr;
  T* gtr = a.grad_target != nullptr ? opaque_row(a.grad_target + base) : nullptr;
  const A one_m_eps = A(1) - P.eps;
  const A* wv = vec_weights(P, 0);  // the class weights in 16-byte loads (from class 0)
  Stats<A> st[V];
  A m[V], log_s[V];
#pragma unroll
  for (int i = 0; i < V; ++i) st[i] = Stats<A>{A(-INFINITY), A(0), A(0), A(0)};
  // The gradient scales, read after pass 1 (not held through its loop).
  auto grad_scales = [&](A(&sg)[V]) {
#pragma unroll
    for (int i = 0; i < V; ++i) sg[i] = grad_scale(P, row0 + i);
  };

  if (!kProb) {
    if (P.fwd) {
      // Smoothing's class weights (load_weights mode kW) are loaded once per class for the V
      // lanes (nvcc does not merge the lanes' loads of the same address).
      auto pass1 = [&](auto smooth, auto wmode) {
        constexpr bool kSmooth = decltype(smooth)::value;
        constexpr int kW = decltype(wmode)::value;
        // A chunk of fewer classes than one 16-byte weight load holds takes scalar loads (the
        // tail's chunk of V / 2 classes starts at a multiple of V: its weights line up).
        constexpr int kWPerLoad = 16 / int(sizeof(A));
        constexpr int kWTail = kW == kWeightVec ? kWeightScalar : kW;
        Pass1Index<T, kSmooth, kCap> f[V];
#pragma unroll
        for (int i = 0; i < V; ++i) f[i] = {xr + i, wv, D, {}, P.cap, P.inv_cap};
        // xv: Vec<T>[V] (cicc 13.0 crashes on an array-reference parameter of a generic lambda).
        lanes_walk_chunks<T, false>(
            xr, nullptr, Ci, Di,
            [&](auto n, int64_t c, const auto& xv, const auto&) {
              constexpr int N = decltype(n)::value;
              A w[N];
              if (kSmooth) load_weights<N % kWPerLoad == 0 ? kW : kWTail>(wv, c, w);
#pragma unroll
              for (int i = 0; i < V; ++i) {
                const Vec<T> xi = lane_gather<T, N>(xv, i);
                f[i].template compute<N, true>(c, xi, xi, w);
              }
            });
#pragma unroll
        for (int i = 0; i < V; ++i) {
          st[i] = f[i].stats();
          if (needs_unfolded_sum(st[i].m)) {
            st[i].s = sum_exp_unfolded<1, kCap>(xr + i, D, C, 0, 1, st[i].m, P.cap, P.inv_cap,
                                                static_cast<Stats<A>*>(nullptr));
          }
        }
      };
      if (P.eps == A(0)) pass1(std::false_type{}, WeightMode<kWeightNone>{});
      else if (a.weight == nullptr) pass1(std::true_type{}, WeightMode<kWeightNone>{});
      else pass1(std::true_type{}, WeightMode<kWeightVec>{});
    }
    // The targets, read after pass 1 (not held through its loop), before any gradient write.
    int64_t y[V];
    bool ignored[V];
    A wy[V], xy[V];  // xy: the target's logit as loaded, read before any gradient write
    bool all_ignored = true;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      y[i] = a.target_index[row0 + i];
      ignored[i] = y[i] == a.ignore_index;
      if (!ignored[i]) TL_DEVICE_ASSERT(y[i] >= 0 && y[i] < C, TL_CE_TARGET_CHECK);
      all_ignored &= ignored[i];
      wy[i] = ignored[i] ? A(0) : (a.weight != nullptr ? a.weight[y[i]] : A(1));
      xy[i] = ignored[i] ? A(0) : to_acc(xr[y[i] * D + i]);
    }
    if (P.fwd) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        m[i] = st[i].m;
        log_s[i] = flog(st[i].s);
        a.row_stats[row0 + i] = m[i];
        a.row_stats[P.rows + row0 + i] = log_s[i];
        A l = 0;
        if (!ignored[i]) {
          const A xc = capped<kCap, kApproxExp<T>>(xy[i], P.cap, P.inv_cap);
          l = one_m_eps * wy[i] * ((m[i] - xc) + log_s[i]);
          if (P.eps != A(0)) l += P.eps_c * (st[i].d + st[i].u * log_s[i]);
          if (P.z != A(0)) l += P.z * (m[i] + log_s[i]) * (m[i] + log_s[i]);
        }
        if (a.reduction == 0) a.loss[row0 + i] = from_acc<T>(l);
        else P.row_loss[row0 + i] = l;
      }
    } else {  // backward: the saved statistics, pass 2 only
#pragma unroll
      for (int i = 0; i < V; ++i) {
        m[i] = saved_stat(P, 0, row0 + i);
        log_s[i] = saved_stat(P, 1, row0 + i);
      }
    }
    if (gir == nullptr) return;
    bool any_reads = !all_ignored;
#pragma unroll
    for (int i = 0; i < V; ++i) any_reads |= ignored[i] && ignored_row_reads<T>(m[i], log_s[i]);
    if (!any_reads) {  // every position ignored with finite statistics: zeros, the row not read
      Pass2Zero<T> f{gir, D};
      Vec<T> none;
      for (int64_t c = 0; c < C; ++c) f.template compute<V>(c * D, none, none);
      return;
    }
    // An ignored position runs with the coefficients that make its gradient 0 * softmax (ce_row's
    // ignored row with non-finite statistics): exactly 0 where the softmax and the class weight
    // are finite. Smoothing's class weight is loaded once per class for the V lanes.
    const A wsum = P.Wsum != nullptr ? *P.Wsum : A(C);
    A sg[V];
    grad_scales(sg);
    auto pass2 = [&](auto smooth, auto wmode) {
      constexpr bool kSmooth = decltype(smooth)::value;
      using F = Pass2Index<T, kSmooth, kCap>;
      F f[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A ls2 = log_s[i] * A(kLog2e);
        if (ignored[i]) {
          f[i] = F{xr + i, gir + i, nullptr, D, m[i], log_s[i], ls2, A(0), A(0), A(0), A(1),
                   A(0), A(0), P.cap, P.inv_cap};
        } else {
          const A wy1 = one_m_eps * wy[i];
          const A zc = A(2) * P.z * (m[i] + log_s[i]);
          f[i] = F{xr + i, gir + i, a.weight, D, m[i], log_s[i], ls2, wy1, wsum, P.eps_c, sg[i],
                   index_softmax_coef<kSmooth>(wy1, zc, sg[i]), zc, P.cap, P.inv_cap};
        }
      }
      lanes_walk<T, false, U>(xr, nullptr, Ci, Di, [&](int64_t c, int o, const Vec<T>& xv,
                                                        const Vec<T>&) {
        A w[1];
        if (kSmooth) load_weights<decltype(wmode)::value>(a.weight, c, w);
        Vec<T> out;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          F fi = f[i];
          fi.gi = &out.v[i];
          fi.stride = 0;
          fi.template compute<1, true>(c, lane_of(xv, i), xv, w);
        }
        st_vec_stream(gir + o, out);
      });
#pragma unroll
      for (int i = 0; i < V; ++i) {
        if (!ignored[i]) f[i].fix_target(y[i], xy[i]);
      }
    };
    if (P.eps_c == A(0)) pass2(std::false_type{}, WeightMode<kWeightNone>{});
    else if (a.weight == nullptr) pass2(std::true_type{}, WeightMode<kWeightNone>{});
    else pass2(std::true_type{}, WeightMode<kWeightScalar>{});
  } else {
    if (P.fwd) {
      // Label smoothing and class weights per launch (t' = t without smoothing, w = 1 without
      // weights): one to two instructions less per element where they are off.
      auto pass1 = [&](auto smooth, auto wmode) {
        constexpr int kW = decltype(wmode)::value;
        Pass1Prob<T, kCap, kW, decltype(smooth)::value> f[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          f[i] = {xr + i, tr + i, wv, D, one_m_eps, P.eps_c, {}, P.cap, P.inv_cap};
        }
        // Weight loads as in the class-index pass 1 above.
        constexpr int kWPerLoad = 16 / int(sizeof(A));
        constexpr int kWTail = kW == kWeightVec ? kWeightScalar : kW;
        lanes_walk_chunks<T, true>(
            xr, tr, Ci, Di,
            [&](auto n, int64_t c, const auto& xv, const auto& tv) {
              // Each position's N classes unpacked straight from the loaded vectors (no gather
              // into vectors of one position), its max from a packed maximum over the N
              // vectors, the N classes' weights loaded once.
              constexpr int N = decltype(n)::value;
              A w[N], wo[N], we[N];
              load_weights<N % kWPerLoad == 0 ? kW : kWTail>(wv, c, w);
              f[0].template target_factors<N>(w, wo, we);
              Vec<T> vmax = xv[0];
              if constexpr (kPackedMax<T, kCap>) vmax = lanes_max<T, N>(xv);
#pragma unroll
              for (int i = 0; i < V; ++i) {
                A xa[N], ta[N];
#pragma unroll
                for (int k = 0; k < N; ++k) {
                  xa[k] = lane_to_acc(xv[k], i);
                  ta[k] = lane_to_acc(tv[k], i);
                }
                f[i].template compute_lane<N>(xa, ta, wo, we, lane_to_acc(vmax, i));
              }
            });
#pragma unroll
        for (int i = 0; i < V; ++i) {
          st[i] = f[i].stats();
          if (needs_unfolded_sum(st[i].m)) {
            st[i].s = sum_exp_unfolded<1, kCap>(xr + i, D, C, 0, 1, st[i].m, P.cap, P.inv_cap,
                                                static_cast<Stats<A>*>(nullptr));
          }
        }
      };
      const bool smooth = P.eps != A(0);
      if (a.weight == nullptr) {
        if (smooth) pass1(std::true_type{}, WeightMode<kWeightNone>{});
        else pass1(std::false_type{}, WeightMode<kWeightNone>{});
      } else {
        if (smooth) pass1(std::true_type{}, WeightMode<kWeightVec>{});
        else pass1(std::false_type{}, WeightMode<kWeightVec>{});
      }
#pragma unroll
      for (int i = 0; i < V; ++i) {
        m[i] = st[i].m;
        log_s[i] = flog(st[i].s);
        A l = st[i].d + st[i].u * log_s[i];
        if (!isfinite(l)) {  // rare: ce_row's term-by-term sum, for this position alone
          ProbLossTerms<T, kCap> terms{xr + i, tr + i, a.weight, D, m[i], log_s[i], one_m_eps,
                                       P.eps_c, P.cap, P.inv_cap, A(0)};
          walk<T, false, kWalkUnrollProb>(terms, C, 0, 0, 1);
          l = terms.sum;
        }
        if (P.z != A(0)) l += P.z * (m[i] + log_s[i]) * (m[i] + log_s[i]);
        a.row_stats[row0 + i] = m[i];
        a.row_stats[P.rows + row0 + i] = log_s[i];
        a.row_stats[2 * P.rows + row0 + i] = st[i].u;
        if (a.reduction == 0) a.loss[row0 + i] = from_acc<T>(l);
        else P.row_loss[row0 + i] = l;
      }
    } else {  // backward: the saved statistics, pass 2 only
#pragma unroll
      for (int i = 0; i < V; ++i) {
        m[i] = saved_stat(P, 0, row0 + i);
        log_s[i] = saved_stat(P, 1, row0 + i);
        st[i].u = saved_stat(P, 2, row0 + i);
      }
    }
    A sg[V];
    grad_scales(sg);
    A tw[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      tw[i] = prob_softmax_coef(st[i].u + A(2) * P.z * (m[i] + log_s[i]), sg[i]);
    }
    auto pass2 = [&](auto gi_flag, auto gt_flag, auto wmode, auto sign) {
      constexpr bool kGI = decltype(gi_flag)::value, kGT = decltype(gt_flag)::value;
      constexpr int kScaled = decltype(sign)::value;
      using F = Pass2Prob<T, kCap, kGI, kGT, decltype(wmode)::value, kScaled>;
      F f[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const A ls2 = log_s[i] * A(kLog2e);
        f[i] = F{xr + i, tr + i, nullptr, nullptr, a.weight, D, m[i], log_s[i],
                 kScaled != 0 ? ls2 - log2f(fabsf(sg[i] * tw[i])) : ls2, tw[i], one_m_eps,
                 P.eps_c, sg[i], P.cap, P.inv_cap};
      }
      lanes_walk<T, kGI, U>(xr, tr, Ci, Di, [&](int64_t c, int o, const Vec<T>& xv,
                                               const Vec<T>& tv) {
        Vec<T> oi, ot;
#pragma unroll
        for (int i = 0; i < V; ++i) {
          F fi = f[i];
          fi.gi = &oi.v[i];
          fi.gt = &ot.v[i];
          fi.stride = 0;
          const A xa[1] = {lane_to_acc(xv, i)};
          const A ta[1] = {kGI ? lane_to_acc(tv, i) : A(0)};
          fi.template compute_acc<1>(c, xa, ta);
        }
        if (kGI) st_vec_stream(gir + o, oi);
        if (kGT) st_vec_stream(gtr + o, ot);
      });
    };
    auto pass2_weights = [&](auto gi_flag, auto gt_flag) {
      using Plain = std::integral_constant<int, 0>;
      if (a.weight == nullptr) return pass2(gi_flag, gt_flag, WeightMode<kWeightNone>{}, Plain{});
      if constexpr (kApproxExp<T> && decltype(gi_flag)::value) {  // Pass2Prob's kScaledExp
        int sign = scaled_exp_sign(sg[0] * tw[0], C);  // the V positions' common sign, or 0
#pragma unroll
        for (int i = 1; i < V; ++i) {
          if (scaled_exp_sign(sg[i] * tw[i], C) != sign) sign = 0;
        }
        if (sign > 0) {
          return pass2(gi_flag, gt_flag, WeightMode<kWeightScalar>{},
                       std::integral_constant<int, 1>{});
        }
        if (sign < 0) {
          return pass2(gi_flag, gt_flag, WeightMode<kWeightScalar>{},
                       std::integral_constant<int, -1>{});
        }
      }
      pass2(gi_flag, gt_flag, WeightMode<kWeightScalar>{}, Plain{});
    };
    if (gir != nullptr && gtr != nullptr) pass2_weights(std::true_type{}, std::true_type{});
    else if (gir != nullptr) pass2_weights(std::true_type{}, std::false_type{});
    else if (gtr != nullptr) pass2_weights(std::false_type{}, std::true_type{});
  }
}

// V positions per thread (ce_lanes); groups of V in a grid-stride loop.
template <typename T, bool kProb, bool kCap>
__global__ void __launch_bounds__(256) ce_column_vec_kernel(const CeParams<T> P) {
  if (skip_backward(P.a)) return;  // issue 13
  constexpr int V = VecTraits<T>::kVec;
  const int64_t D = P.a.D, groups_per_n = D / V, groups = P.rows / V;
  for (int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = g / groups_per_n, d0 = (g - n * groups_per_n) * V;
    ce_lanes<T, kProb, kCap>(P, g * V, n * P.a.C * D + d0);
  }
}

// Weight of a row's target (0 when ignored): the class-index mean's denominator W. A target out
// of bounds counts 0 here (no assert in the sum's unrolled loop): the row kernel asserts on it.
template <typename A>
struct TargetWeightLoad {
  const int64_t* target;
  const A* weight;
  int64_t C, ignore_index;
  __device__ __forceinline__ A operator()(int64_t i) const {
    const int64_t y = target[i];
    if (y == ignore_index || y < 0 || y >= C) return A(0);
    return weight != nullptr ? weight[y] : A(1);
  }
};

// ---- split rows (class index, D == 1; launchers.h: ce_split_count and ce_cluster_count) ----
// A row is cut into S slices, one block each. On sm_90 the S blocks of a row form a thread-block
// cluster (ce_cluster_kernel): each keeps its slice in shared memory as it reads it, so the row is
// read once from DRAM, and the S partial statistics go through distributed shared memory.
// Elsewhere (or where the slice does not fit, or a cluster cannot be scheduled) two kernels:
// ce_split_stats_kernel writes the partials to global memory, ce_split_grad_kernel merges them
// and re-reads its slice (from L2 at the shapes this is picked for). Both walk the same slices
// with the same threads and merge the partials in the same fixed order, so they give the same
// bits (tests/test_cuda_emu_cluster.py); S depends on the shape only.
//
// Block k of a row walks classes [c0, c0 + len): k L up to (k + 1) L, L = C / S rounded up to
// whole vectors.
template <typename T>
__device__ __forceinline__ void split_slice(int64_t C, int64_t S, int64_t k, int64_t& c0,
                                            int64_t& len) {
  constexpr int V = VecTraits<T>::kVec;
  const int64_t L = ((C + S - 1) / S + V - 1) / V * V;
  c0 = k * L < C ? k * L : C;
  len = (c0 + L < C ? c0 + L : C) - c0;
}

// Threads per slice block: 64 to 512, ~16 vectors each.
template <typename T>
inline int split_threads(int64_t C, int64_t S) {
  const int64_t nvec = (C / S) / VecTraits<T>::kVec;
  int threads = 64;
  while (threads < 512 && threads * 16 < nvec) threads *= 2;
  return threads;
}

// Pass 1 of a slice, pass1(WeightMode<kW>) -> Stats, with the class-weight mode label
// smoothing reads the weights in, as ce_row's launcher picks it: none; on the vector path
// 16-byte loads (the slice's weights from vec_weights). Double rows keep the one loop (with the
// three of an earlier version, the split kernel spilled in its loops; not a performance target).
template <bool kSmooth, bool kVec, typename A, class F>
__device__ __forceinline__ auto split_pass1(const A* weights, F&& pass1) {
  if constexpr (!kSmooth) {
    return pass1(WeightMode<kWeightNone>{});
  } else if constexpr (!kVec || sizeof(A) == 8) {
    return pass1(WeightMode<kWeightAny>{});
  } else {
    if (weights == nullptr) return pass1(WeightMode<kWeightNone>{});
    return pass1(WeightMode<kWeightVec>{});
  }
}

// Kernel 1: each slice's statistics, and x_y (read before kernel 2 may write the gradient over
// it in place).
template <typename T, bool kVec, bool kSmooth, bool kCap>
__global__ void __launch_bounds__(512) ce_split_stats_kernel(const CeParams<T> P, int64_t S) {
  using A = acc_t<T>;
  if (skip_backward(P.a)) return;  // issue 13
  __shared__ Stats<A> smem[32];
  const CrossEntropyArgs<T>& a = P.a;
  const int64_t row = blockIdx.x / S, k = blockIdx.x % S;
  int64_t c0, len;
  split_slice<T>(a.C, S, k, c0, len);
  const T* xs = a.input + row * a.C + c0;
  const int head = vec_head<T, kVec>(xs, len);
  const A* ws = a.weight != nullptr ? vec_weights(P, c0 + head) + c0 : nullptr;
  auto pass1 = [&](auto wmode) {
    Pass1Index<T, kSmooth, kCap, decltype(wmode)::value> f{
        xs, ws, 1, {}, P.cap, P.inv_cap};
    walk<T, kVec, kWalkUnrollIndex>(f, len, head, threadIdx.x, blockDim.x);
    return f.stats();
  };
  Stats<A> st = block_allreduce<kSmooth>(split_pass1<kSmooth, kVec>(ws, pass1), smem);
  if (needs_unfolded_sum(st.m)) {
    st.s = sum_exp_unfolded<0, kCap>(xs, 1, len, threadIdx.x, blockDim.x, st.m, P.cap, P.inv_cap,
                                     smem);
  }
  if (threadIdx.x == 0) {
    A* part = P.split + (row * S + k) * 4;
    part[0] = st.m;
    part[1] = st.s;
    part[2] = st.u;
    part[3] = st.d;
    const int64_t y = a.target_index[row];
    if (k == 0 && P.fwd && y != a.ignore_index && y >= 0 && y < a.C) {
      P.split[a.N * a.D * S * 4 + row] =
          capped<kCap, kApproxExp<T>>(to_acc(a.input[row * a.C + y]), P.cap, P.inv_cap);
    }
  }
}

// The row's loss and lse from its merged statistics st (both split paths; xy = the capped x_y).
template <typename T>
__device__ __forceinline__ void split_row_loss(const CeParams<T>& P, int64_t row,
                                               const Stats<acc_t<T>>& st, bool ignored,
                                               acc_t<T> wy, acc_t<T> xy) {
  using A = acc_t<T>;
  const A m = st.m, log_s = flog(st.s);
  P.a.row_stats[row] = m;
  P.a.row_stats[P.rows + row] = log_s;
  A l = 0;
  if (!ignored) {
    l = (A(1) - P.eps) * wy * ((m - xy) + log_s);
    if (P.eps != A(0)) l += P.eps_c * (st.d + st.u * log_s);
    if (P.z != A(0)) l += P.z * (m + log_s) * (m + log_s);
  }
  if (P.a.reduction == 0) P.a.loss[row] = from_acc<T>(l);
  else P.row_loss[row] = l;
}

// Pass 2 reading the slice from shared memory (the cluster kernel): plain loads.
template <typename T, bool kSmooth, bool kCap>
struct Pass2IndexShared : Pass2Index<T, kSmooth, kCap> {
  __device__ __forceinline__ explicit Pass2IndexShared(const Pass2Index<T, kSmooth, kCap>& p)
      : Pass2Index<T, kSmooth, kCap>(p) {}
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>&) const {
    if (N == 1) xv.v[0] = this->x[c];
    else xv = ld_vec(this->x + c);
  }
};
template <typename T, bool kSmooth, bool kCap, bool kShared>
using Pass2Slice = typename std::conditional<kShared, Pass2IndexShared<T, kSmooth, kCap>,
                                             Pass2Index<T, kSmooth, kCap>>::type;

// The gradient of slice [c0, c0 + len) of a row with merged statistics st; xs: the slice's
// logits, in global memory or (kShared) in shared memory with the same alignment modulo 16
// (head: its scalar head, vec_head of the global slice).
template <typename T, bool kVec, bool kSmooth, bool kCap, bool kShared>
__device__ __forceinline__ void split_slice_grad(const CeParams<T>& P, int64_t row, int64_t y,
                                                 bool ignored, acc_t<T> wy, acc_t<T> m,
                                                 acc_t<T> log_s, const T* xs, int64_t c0,
                                                 int64_t len, int head) {
  using A = acc_t<T>;
  const CrossEntropyArgs<T>& a = P.a;
  T* gs = a.grad_input + row * a.C + c0;
  const int gt = threadIdx.x, G = blockDim.x;
  if (ignored && ignored_row_reads<T>(m, log_s)) {  // as in ce_row
    Pass2Slice<T, false, kCap, kShared> f(Pass2Index<T, false, kCap>{
        xs, gs, nullptr, 1, m, log_s, log_s * A(kLog2e), A(0), A(0), A(0), A(1), A(0), A(0),
        P.cap, P.inv_cap});
    walk<T, kVec, kWalkUnrollIndex>(f, len, head, gt, G);
    return;
  }
  if (ignored) {
    Pass2Zero<T> f{gs, 1};
    walk<T, kVec, kWalkUnrollIndex>(f, len, head, gt, G);
    return;
  }
  // As in ce_row: the thread that walks class y reads x_y before writing it, then fixes it up.
  const bool owns_y = y >= c0 && y < c0 + len && gt == walk_owner<T, kVec>(y - c0, len, head, G);
  const A xy_own = owns_y ? to_acc(xs[y - c0]) : A(0);
  const A wsum = P.Wsum != nullptr ? *P.Wsum : A(a.C);
  const A wy1 = (A(1) - P.eps) * wy;
  const A zc = A(2) * P.z * (m + log_s);
  const A sg = grad_scale(P, row);
  Pass2Slice<T, kSmooth, kCap, kShared> f(Pass2Index<T, kSmooth, kCap>{
      xs, gs, a.weight != nullptr ? a.weight + c0 : nullptr, 1, m, log_s, log_s * A(kLog2e),
      wy1, wsum, P.eps_c, sg, index_softmax_coef<kSmooth>(wy1, zc, sg), zc, P.cap,
      P.inv_cap});
  walk<T, kVec, kWalkUnrollIndex>(f, len, head, gt, G);
  if (owns_y) f.fix_target(y - c0, xy_own);
}

// Kernel 2: the row's S partials merged in a fixed order (the same bits in every block), the
// loss (block k = 0) and the slice's gradient.
template <typename T, bool kVec, bool kSmooth, bool kCap>
__global__ void __launch_bounds__(512) ce_split_grad_kernel(const CeParams<T> P, int64_t S) {
  using A = acc_t<T>;
  if (skip_backward(P.a)) return;  // issue 13
  const CrossEntropyArgs<T>& a = P.a;
  const int64_t row = blockIdx.x / S, k = blockIdx.x % S;
  const int64_t y = a.target_index[row];
  const bool ignored = y == a.ignore_index;
  if (!ignored) TL_DEVICE_ASSERT(y >= 0 && y < a.C, TL_CE_TARGET_CHECK);
  const A wy = ignored ? A(0) : (a.weight != nullptr ? a.weight[y] : A(1));
  A m, log_s;
  if (P.fwd) {
    const A* part = P.split + row * S * 4;
    Stats<A> st{part[0], part[1], part[2], part[3]};
    for (int64_t j = 1; j < S; ++j) {
      st = merge<kSmooth>(st, Stats<A>{part[4 * j], part[4 * j + 1], part[4 * j + 2],
                                       part[4 * j + 3]});
    }
    m = st.m;
    log_s = flog(st.s);
    if (k == 0 && threadIdx.x == 0) {
      split_row_loss(P, row, st, ignored, wy, ignored ? A(0) : P.split[a.N * a.D * S * 4 + row]);
    }
  } else {  // backward: the saved statistics (launch_split runs no stats kernel)
    m = saved_stat(P, 0, row);
    log_s = saved_stat(P, 1, row);
  }
  if (a.grad_input == nullptr) return;
  int64_t c0, len;
  split_slice<T>(a.C, S, k, c0, len);
  const T* xs = a.input + row * a.C + c0;
  split_slice_grad<T, kVec, kSmooth, kCap, false>(P, row, y, ignored, wy, m, log_s, xs, c0, len,
                                                  vec_head<T, kVec>(xs, len));
}

// ---- split rows in a thread-block cluster (sm_90) ----
// The S blocks of a cluster walk the S slices of one row (block rank k: slice k). Pass 1 stores
// each loaded vector into the block's shared memory as it folds it into the statistics; thread 0
// puts the block's partial (and the capped x_y, when y is in its slice) in shared memory; after a
// cluster barrier, threads j < S copy block j's partial through distributed shared memory, and
// every thread merges them in the order j = 0..S-1 (as kernel 2); pass 2 reads the slice back
// from shared memory. A second barrier, arrived at once the copies are done and waited for at the
// end, keeps every block's shared memory alive until the others have read it. The gradient may
// alias the input: a block writes only its own slice, after reading all of it.
// Dynamic shared memory (cluster_smem_bytes): the block reduction's 32 Stats, the block's
// partial, the S partials copied, then the slice, shifted by the input's misalignment modulo 16
// so that the vector walk of the global slice and of its copy are the same.
template <typename A>
struct SlicePartial {
  Stats<A> st;
  A xy;  // the capped x_y: in the partial of the block whose slice holds y
};
constexpr int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }
template <typename A>
constexpr int64_t kClusterPartOffset = 32 * int64_t(sizeof(Stats<A>));
template <typename A>
constexpr int64_t kClusterPartsOffset = kClusterPartOffset<A> + round16(sizeof(SlicePartial<A>));
template <typename A>
constexpr int64_t kClusterSliceOffset =
    round16(kClusterPartsOffset<A> + kCeSplitMax * int64_t(sizeof(SlicePartial<A>)));

template <typename T>
inline size_t cluster_smem_bytes(int64_t C, int64_t S) {
  constexpr int V = VecTraits<T>::kVec;
  const int64_t L = ((C + S - 1) / S + V - 1) / V * V;  // split_slice's slice length
  return size_t(kClusterSliceOffset<acc_t<T>> + round16(L * int64_t(sizeof(T)) + 16));
}

// Pass 1 of the cluster kernel: Pass1Index reading the slice once (evict-first) and keeping it.
template <typename T, bool kSmooth, bool kCap, int kW>
struct Pass1IndexKeep : Pass1Index<T, kSmooth, kCap, kW> {
  T* keep;  // the slice in shared memory
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>&) const {
    if (N == 1) xv.v[0] = this->x[c];
    else xv = ld_vec_last(this->x + c);
  }
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>& tv) {
    if (N == 1) keep[c] = xv.v[0];
    else st_vec(keep + c, xv);
    Pass1Index<T, kSmooth, kCap, kW>::template compute<N>(c, xv, tv);
  }
};

template <typename T, bool kVec, bool kSmooth, bool kCap>
__global__ void __launch_bounds__(512) ce_cluster_kernel(const CeParams<T> P, int64_t S) {
#if defined(TL_HAVE_CLUSTERS)
  using A = acc_t<T>;
  if (skip_backward(P.a)) return;  // issue 13 (every block of the cluster: no barrier waits)
  const CrossEntropyArgs<T>& a = P.a;
  const int64_t row = blockIdx.x / S;
  const unsigned k = cluster_block_rank();  // blockIdx.x % S: clusters are S blocks along x
  unsigned char* sm = dynamic_smem();
  Stats<A>* red = reinterpret_cast<Stats<A>*>(sm);
  SlicePartial<A>* own = reinterpret_cast<SlicePartial<A>*>(sm + kClusterPartOffset<A>);
  SlicePartial<A>* parts = reinterpret_cast<SlicePartial<A>*>(sm + kClusterPartsOffset<A>);
  int64_t c0, len;
  split_slice<T>(a.C, S, k, c0, len);
  const T* xs = a.input + row * a.C + c0;
  T* keep = reinterpret_cast<T*>(sm + kClusterSliceOffset<A> +
                                 (reinterpret_cast<uintptr_t>(xs) & 15));
  const int64_t y = a.target_index[row];
  const bool ignored = y == a.ignore_index;
  if (!ignored) TL_DEVICE_ASSERT(y >= 0 && y < a.C, TL_CE_TARGET_CHECK);
  const A wy = ignored ? A(0) : (a.weight != nullptr ? a.weight[y] : A(1));
  const int head = vec_head<T, kVec>(xs, len);
  const A* ws = a.weight != nullptr ? vec_weights(P, c0 + head) + c0 : nullptr;
  auto pass1 = [&](auto wmode) {
    constexpr int kW = decltype(wmode)::value;
    Pass1IndexKeep<T, kSmooth, kCap, kW> f{
        {xs, ws, 1, {}, P.cap, P.inv_cap}, keep};
    // Class weights loaded: half the unroll (bf16 12.1-12.3 -> 11.3-12.0 instructions per
    // element with the copy to shared memory; 32 KB still in flight per SM).
    walk<T, kVec, kW == kWeightNone ? kWalkUnrollIndex : kWalkUnrollProb>(f, len, head,
                                                                          threadIdx.x, blockDim.x);
    return f.stats();
  };
  // block_allreduce's barriers also complete `keep`
  Stats<A> st_k = block_allreduce<kSmooth>(split_pass1<kSmooth, kVec>(ws, pass1), red);
  if (needs_unfolded_sum(st_k.m)) {
    st_k.s = sum_exp_unfolded<0, kCap>(xs, 1, len, threadIdx.x, blockDim.x, st_k.m, P.cap,
                                       P.inv_cap, red);
  }
  if (threadIdx.x == 0) {
    own->st = st_k;
    own->xy = !ignored && y >= c0 && y < c0 + len
                  ? capped<kCap, kApproxExp<T>>(to_acc(keep[y - c0]), P.cap, P.inv_cap)
                  : A(0);
  }
  cluster_arrive();  // release: the partial, to every block of the cluster after its wait
  cluster_wait();
  if (threadIdx.x < S) parts[threadIdx.x] = *cluster_map(own, threadIdx.x);
  __syncthreads();
  cluster_arrive();  // done with the other blocks' shared memory (waited for before exiting)
  Stats<A> st = parts[0].st;
  for (int64_t j = 1; j < S; ++j) st = merge<kSmooth>(st, parts[j].st);
  if (P.fwd && k == 0 && threadIdx.x == 0) {
    A xy = 0;
    if (!ignored) {
      int64_t cj, lj;
      for (int64_t j = 0; j < S; ++j) {
        split_slice<T>(a.C, S, j, cj, lj);
        if (y >= cj && y < cj + lj) xy = parts[j].xy;
      }
    }
    split_row_loss(P, row, st, ignored, wy, xy);
  }
  if (a.grad_input != nullptr) {
    split_slice_grad<T, kVec, kSmooth, kCap, true>(P, row, y, ignored, wy, st.m, flog(st.s),
                                                   keep, c0, len, head);
  }
  cluster_wait();
#else
  __trap();  // launched only where the sm_90 code runs (cluster_launch_ok)
#endif
}

template <typename T, bool kVec, bool kSmooth, bool kCap>
void launch_split(const CeParams<T>& P, int64_t S, cudaStream_t stream) {
  const int threads = split_threads<T>(P.a.C, S);
  const unsigned grid = unsigned(P.rows * S);
  if (P.fwd) {  // a backward reads the forward's row statistics
    launch_kernel<ce_split_stats_kernel<T, kVec, kSmooth, kCap>>(grid, threads, 0, stream, P, S);
  }
  launch_kernel<ce_split_grad_kernel<T, kVec, kSmooth, kCap>>(grid, threads, 0, stream, P, S);
}

// The cluster path, when this device runs it for S slices of this row (false: not launched).
template <typename T, bool kVec, bool kSmooth, bool kCap>
bool launch_cluster(const CeParams<T>& P, int64_t S, cudaStream_t stream) {
  constexpr auto kKernel = ce_cluster_kernel<T, kVec, kSmooth, kCap>;
  const int threads = split_threads<T>(P.a.C, S);
  const size_t smem = cluster_smem_bytes<T>(P.a.C, S);
  if (!cluster_launch_ok<kKernel>(unsigned(S), threads, smem)) return false;
  launch_cluster_kernel<kKernel>(unsigned(P.rows * S), threads, unsigned(S), smem, stream, P, S);
  return true;
}

template <typename T, bool kVec, bool kSmooth, bool kCap>
bool launch_split_rows(const CeParams<T>& P, cudaStream_t stream) {
  // A backward op reads the saved statistics and each row once already: no cluster needed.
  const int64_t Sc = P.fwd ? ce_cluster_count(P.rows, P.a.C, int64_t(sizeof(T))) : 1;
  if (Sc > 1 && launch_cluster<T, kVec, kSmooth, kCap>(P, Sc, stream)) return true;
  const int64_t S = ce_split_count(P.rows, P.a.C);
  if (S <= 1) return false;
  launch_split<T, kVec, kSmooth, kCap>(P, S, stream);
  return true;
}

// Splits the rows when there are too few, or (sm_90 clusters) when they are too long for the row
// kernel's second read to hit L2 (class index, with statistics).
template <typename T, bool kProb, bool kCap>
bool try_split(const CeParams<T>& P, bool vec, cudaStream_t stream) {
  if constexpr (!kProb) {
    const bool smooth = P.eps != acc_t<T>(0);
    if (vec && smooth) return launch_split_rows<T, true, true, kCap>(P, stream);
    if (vec) return launch_split_rows<T, true, false, kCap>(P, stream);
    if (smooth) return launch_split_rows<T, false, true, kCap>(P, stream);
    return launch_split_rows<T, false, false, kCap>(P, stream);
  } else {
    return false;
  }
}

// Class weights read class by class (in the passes' loops): label smoothing's sum over the
// classes, or probability targets (ce_scratch_size's per_class_weights).
template <typename T>
bool weights_per_class(const CrossEntropyArgs<T>& a) {
  return a.weight != nullptr && (a.target_prob != nullptr || a.label_smoothing != 0.0);
}

// Whether every vector walk starts its vectors at a class c with a.weight + c 16-byte aligned
// (else vec_weights needs the shifted copies). The column kernels walk from class 0. Rows (row
// layout) from their scalar head: one head for all where row strides are whole 16 bytes, else
// heads of their own. Split slices start at whole vectors from the row's start.
template <typename T>
bool weights_line_up(const CrossEntropyArgs<T>& a) {
  if (!a.rows_strided) return aligned16(a.weight);
  const uintptr_t xa = reinterpret_cast<uintptr_t>(a.input);
  if (xa % sizeof(T) != 0) return true;  // no vector path
  if ((a.N > 1 && (a.x_stride_n * int64_t(sizeof(T))) % 16 != 0) ||
      (a.D > 1 && (a.x_stride_d * int64_t(sizeof(T))) % 16 != 0)) {
    return false;
  }
  const int64_t head = std::min<int64_t>(((16 - (xa & 15)) & 15) / sizeof(T), a.C);
  return aligned16(a.weight + head);
}

// vec_weights' copies: copy j holds weight[k] at j pitch + (kPerLoad - j) % kPerLoad + k.
template <typename A>
__global__ void __launch_bounds__(256)
    ce_weight_copies_kernel(const A* weight, int64_t C, A* copies, int64_t pitch) {
  constexpr int kPerLoad = 16 / int(sizeof(A));
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < kPerLoad * C;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i / C, k = i - j * C;
    copies[j * pitch + (kPerLoad - j) % kPerLoad + k] = weight[k];
  }
}

// The row kernel for the vector flag and class-weight mode chosen by launch_main.
template <typename T, bool kProb, int kGroup, bool kCap>
void launch_row(const CeParams<T>& P, bool vec, int wmode, unsigned grid, int threads,
                cudaStream_t stream) {
  if (!vec) {
    launch_kernel<ce_row_kernel<T, kProb, false, kGroup, kCap, kWeightAny>>(grid, threads, 0,
                                                                          stream, P);
  } else if (wmode == kWeightNone) {
    launch_kernel<ce_row_kernel<T, kProb, true, kGroup, kCap, kWeightNone>>(grid, threads, 0,
                                                                           stream, P);
  } else {
    launch_kernel<ce_row_kernel<T, kProb, true, kGroup, kCap, kWeightVec>>(grid, threads, 0,
                                                                          stream, P);
  }
}

// The class-index row kernel with the row cached in registers, for the class-weight mode.
template <typename T, int kGroup, bool kCap>
void launch_row_cached(const CeParams<T>& P, int wmode, unsigned grid, int threads,
                       cudaStream_t stream) {
  constexpr int K = kRowCacheVectors;
  if (wmode == kWeightNone) {
    launch_kernel<ce_row_kernel<T, false, true, kGroup, kCap, kWeightNone, K>>(grid, threads, 0,
                                                                              stream, P);
  } else {
    launch_kernel<ce_row_kernel<T, false, true, kGroup, kCap, kWeightVec, K>>(grid, threads, 0,
                                                                             stream, P);
  }
}

template <typename T, bool kProb, bool kCap>
void launch_main(const CeParams<T>& P, cudaStream_t stream) {
  const CrossEntropyArgs<T>& a = P.a;
  const int64_t sms = num_sms();
  constexpr int V = VecTraits<T>::kVec;
  if (a.rows_strided && a.C >= 64) {
    // Vector path when every array the row kernel touches has the input's misalignment in every
    // row: the same at row 0, and row strides that differ by whole 16-byte vectors.
    const uintptr_t xa = reinterpret_cast<uintptr_t>(a.input);
    auto same = [xa](const void* p) {
      return p == nullptr || ((reinterpret_cast<uintptr_t>(p) - xa) & 15) == 0;
    };
    auto same_steps = [&a](int64_t sn, int64_t sd) {
      return (a.N <= 1 || (a.x_stride_n - sn) % V == 0) && (a.D <= 1 || (a.x_stride_d - sd) % V == 0);
    };
    const bool grads = a.grad_input != nullptr || a.grad_target != nullptr;
    const bool vec = a.C <= kVecWalkMaxC && (xa % sizeof(T)) == 0 && same(a.target_prob) &&
                     same(a.grad_input) && same(a.grad_target) &&
                     (a.target_prob == nullptr || same_steps(a.t_stride_n, a.t_stride_d)) &&
                     (!grads || same_steps(a.D * a.C, a.C));
    const int64_t nvec = a.C / V;
    // The split kernels index the contiguous (N, C).
    const bool contiguous = a.D == 1 && a.x_stride_n == a.C &&
                            (a.target_prob == nullptr || a.t_stride_n == a.C);
    if (contiguous && try_split<T, kProb, kCap>(P, vec, stream)) return;
    // Class weights read class by class: in 16-byte loads (vec_weights).
    const int wmode = weights_per_class(a) ? kWeightVec : kWeightNone;
    // A warp per row up to 32 K vectors, else a block of the fewest threads (a power of two,
    // 64 .. 512) that give each at most K vectors; one rule with and without the row cache,
    // so that a forward's statistics (and loss) are the same bits with or without a gradient.
    // A forward that writes the gradient of rows of at most 512 K vectors holds each thread's
    // share of the row in registers (RowCache): one read.
    constexpr int K = kRowCacheVectors;
    const bool cached = !kProb && vec && P.fwd && a.grad_input != nullptr && nvec <= 512 * K;
    if (nvec <= 32 * K) {
      constexpr int kThreads = 256;
      const unsigned grid = grid_for((P.rows + 7) / 8, sms * 8);
      if (cached) launch_row_cached<T, 32, kCap>(P, wmode, grid, kThreads, stream);
      else launch_row<T, kProb, 32, kCap>(P, vec, wmode, grid, kThreads, stream);
    } else {
      int threads = 64;
      while (threads < 512 && threads * K < nvec) threads *= 2;
      int64_t cap = sms * (2048 / threads);
      if (cached) {
        launch_row_cached<T, 0, kCap>(P, wmode, grid_for(P.rows, cap), threads, stream);
        return;
      }
      // Rows in flight at once = grid (grid-stride loop). Pass 2 re-reads a row from L2 only if
      // the rows in flight fit in it: cap the grid at ~60% of L2 / row bytes (but >= 1 per SM).
      // A backward reads each row once: no cap.
      const int64_t row_bytes = a.C * int64_t(sizeof(T)) * (kProb ? 2 : 1);
      if (P.fwd) cap = std::min(cap, std::max(sms, l2_bytes() * 6 / 10 / row_bytes));
      launch_row<T, kProb, 0, kCap>(P, vec, wmode, grid_for(P.rows, cap), threads, stream);
    }
  } else if (!a.rows_strided && a.D % V == 0 && ce_column_vec_fits(a.C, a.D) &&
             aligned16(a.input) && aligned16(a.target_prob) && aligned16(a.grad_input) &&
             aligned16(a.grad_target)) {
    // The contiguous (N, C, D) in whole 16-byte vectors of d (nullptr counts as aligned).
    const unsigned grid = grid_for((P.rows / V + 255) / 256, sms * 8);
    launch_kernel<ce_column_vec_kernel<T, kProb, kCap>>(grid, 256, 0, stream, P);
  } else {
    const unsigned grid = grid_for((P.rows + 255) / 256, sms * 8);
    launch_kernel<ce_column_kernel<T, kProb, kCap>>(grid, 256, 0, stream, P);
  }
}

}  // namespace

template <typename T>
void launch_cross_entropy(const CrossEntropyArgs<T>& a, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t rows = a.N * a.D;
  const bool prob = a.target_prob != nullptr;
  const bool fwd = a.grad_output == nullptr;
  const bool mean = a.reduction == 1;
  A* W = a.scratch;          // [0]: class-index mean denominator
  A* Wsum = a.scratch + 1;   // [1]: sum of class weights
  A* row_loss = a.scratch + 4;
  A* partials = a.scratch + 4 + rows;
  A* split = partials + reduce_num_chunks(rows > a.C ? rows : a.C);
  // 16-byte aligned (scratch is; ce_weight_copies_size leaves the room)
  A* copies = reinterpret_cast<A*>(
      (reinterpret_cast<uintptr_t>(split + ce_split_scratch(rows, a.C)) + 15) & ~uintptr_t(15));
  if (!fwd && a.grad_input == nullptr && a.grad_target == nullptr) return;

  CeParams<T> P;
  P.a = a;
  if (!a.rows_strided && a.D == 1) {  // the contiguous (N, C): the row layout with row stride C
    P.a.rows_strided = true;
    P.a.x_stride_n = P.a.t_stride_n = a.C;
    P.a.x_stride_d = P.a.t_stride_d = 0;
  }
  P.eps = A(a.label_smoothing);
  P.eps_c = a.C > 0 ? A(a.label_smoothing / double(a.C)) : A(0);
  P.s_host = (prob && mean && rows > 0) ? 1.0 / double(rows) : 1.0;
  P.W = nullptr;
  P.Wsum = nullptr;
  P.row_loss = row_loss;
  P.split = split;
  P.z = A(a.z_loss);
  P.cap = A(a.softcap);
  P.inv_cap = a.softcap > 0 ? A(1.0 / a.softcap) : A(0);
  P.fwd = fwd;
  P.rows = rows;
  for (const A*& w : P.weight_at) w = a.weight;
  if (rows > 0 && weights_per_class(P.a) && !weights_line_up(P.a)) {
    // Class weights that do not line up with the vector walks: 16 / sizeof(A) shifted copies
    // (C x 4 or 8 B each), so that the hot loops load them in 16 bytes (vec_weights).
    constexpr int kPerLoad = 16 / int(sizeof(A));
    const int64_t pitch = (a.C + 2 * kPerLoad - 1) / kPerLoad * kPerLoad;  // >= C + kPerLoad - 1
    for (int j = 0; j < kPerLoad; ++j) {
      P.weight_at[j] = copies + j * pitch + (kPerLoad - j) % kPerLoad;
    }
    const unsigned grid = unsigned(std::min<int64_t>((kPerLoad * a.C + 255) / 256, 1024));
    launch_kernel<ce_weight_copies_kernel<A>>(grid, 256, 0, stream, a.weight, a.C, copies,
                                              pitch);
  }

  if (!prob && mean) {
    deterministic_sum<A, T>(TargetWeightLoad<A>{a.target_index, a.weight, a.C, a.ignore_index},
                            rows, partials, nullptr, A(1), nullptr, W, stream);
    P.W = W;
  }
  if (!prob && a.weight != nullptr && a.label_smoothing != 0.0) {
    deterministic_sum<A, T>(ArrayLoad<A>{a.weight}, a.C, partials, nullptr, A(1), nullptr, Wsum,
                            stream);
    P.Wsum = Wsum;
  }
  if (rows > 0) {
    const bool cap = a.softcap > 0;
    if (prob && cap) launch_main<T, true, true>(P, stream);
    else if (prob) launch_main<T, true, false>(P, stream);
    else if (cap) launch_main<T, false, true>(P, stream);
    else launch_main<T, false, false>(P, stream);
  }
  if (fwd && a.reduction != 0) {
    // mean: / W (class index, on the device) or / rows (probabilities); 0 rows: 0/0 = nan.
    deterministic_sum<A, T>(ArrayLoad<A>{row_loss}, rows, partials, P.W,
                            (prob && mean) ? A(rows) : A(1), a.loss, nullptr, stream);
  }
}

}  // namespace cuda
}  // namespace torch_losses
