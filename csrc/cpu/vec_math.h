// Math<T> for at::vec::Vectorized, so that the loss formulas of csrc/losses run vectorized on
// the CPU. Comparisons of Vectorized values give lane masks; where() blends on them.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "losses/math.h"

namespace torch_losses {

// The vectorized exp's constants (avx2_math::exp below, and its AVX-512 lanes in
// csrc/cpu/ce_rows_avx512.h): exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in
// [-ln2/2, ln2/2] (Cody-Waite: the high part of ln 2 has 15 significant bits, so n ln2_hi is
// exact); exp(r) by its Taylor series to r^8 (truncation < 1e-9 relative).
namespace exp_poly {
constexpr float kLowest = -104.0f;  // below: 0 after the subnormals
constexpr float kHighest = 88.8f;   // above: inf
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187e-06f;
constexpr float kR8 = 1.0f / 40320, kR7 = 1.0f / 5040, kR6 = 1.0f / 720, kR5 = 1.0f / 120,
                kR4 = 1.0f / 24, kR3 = 1.0f / 6, kR2 = 0.5f;
}  // namespace exp_poly

#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
// exp, log and log1p of 8 floats, inlined, within 1 ulp (0.98, 0.89 and 0.89 ulp at most over a
// sweep of every 3rd-13th float against double; tests/test_vec_math.py checks them through the
// losses), in place of the Sleef calls behind at::vec's exp/log/log1p: cheaper (log1pf there
// works in double-float pairs), and the compiler sees through them (1 / (1 + x) shared below).
// Special values as the C library: exp(nan) = nan, log(0) = -inf, log(x < 0) = nan,
// log1p(-1) = -inf, log1p(-0) = -0, inf -> inf; subnormal inputs and results kept.
namespace avx2_math {

inline __m256 splat(float v) { return _mm256_set1_ps(v); }
inline __m256 blend(__m256 mask, __m256 a, __m256 b) { return _mm256_blendv_ps(b, a, mask); }

// exp (exp_poly); 2^n applied in two halves so that subnormal results round once.
inline __m256 exp(__m256 x) {
  using namespace exp_poly;
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, splat(kLowest)), splat(kHighest));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, splat(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, splat(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, splat(kLn2Lo), r);
  __m256 p = splat(kR8);
  p = _mm256_fmadd_ps(p, r, splat(kR7));
  p = _mm256_fmadd_ps(p, r, splat(kR6));
  p = _mm256_fmadd_ps(p, r, splat(kR5));
  p = _mm256_fmadd_ps(p, r, splat(kR4));
  p = _mm256_fmadd_ps(p, r, splat(kR3));
  p = _mm256_fmadd_ps(p, r, splat(kR2));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);  // r + r^2 (1/2 + ...)
  p = _mm256_add_ps(p, splat(1.0f));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  const __m256 result = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  return blend(_mm256_cmp_ps(x, x, _CMP_UNORD_Q), x, result);
}

// log(1 + f) for f = m - 1, m in [sqrt(2)/2, sqrt(2)): with s = f / (2 + f),
// log(1 + f) = 2 atanh(s) = f - f^2/2 + s (f^2/2 + R), R = sum_k 2 s^2k / (2k + 1), k = 1..4
// (|s| < 0.172: truncation < 1e-9 relative). Returns the terms after f, so that the caller adds
// the large ones last.
inline __m256 log1p_reduced_tail(__m256 f) {
  const __m256 s = _mm256_div_ps(f, _mm256_add_ps(splat(2.0f), f));
  const __m256 z = _mm256_mul_ps(s, s);
  __m256 R = _mm256_fmadd_ps(splat(2.0f / 9), z, splat(2.0f / 7));
  R = _mm256_fmadd_ps(R, z, splat(2.0f / 5));
  R = _mm256_fmadd_ps(R, z, splat(2.0f / 3));
  R = _mm256_mul_ps(R, z);
  const __m256 hfsq = _mm256_mul_ps(_mm256_mul_ps(splat(0.5f), f), f);
  return _mm256_sub_ps(_mm256_mul_ps(s, _mm256_add_ps(hfsq, R)), hfsq);
}

// u > 0 normal as 2^k m, m in [sqrt(2)/2, sqrt(2)): returns m - 1 (exact) and k.
inline __m256 reduce(__m256 u, __m256i& k) {
  const __m256i iu = _mm256_add_epi32(_mm256_castps_si256(u),
                                      _mm256_set1_epi32(0x3f800000 - 0x3f3504f3));
  k = _mm256_sub_epi32(_mm256_srai_epi32(iu, 23), _mm256_set1_epi32(127));
  const __m256i im = _mm256_add_epi32(_mm256_and_si256(iu, _mm256_set1_epi32(0x007fffff)),
                                      _mm256_set1_epi32(0x3f3504f3));
  return _mm256_sub_ps(_mm256_castsi256_ps(im), splat(1.0f));
}

// k ln 2 + f + tail + low, the small terms first; ln 2 split as in exp (k ln2_hi exact).
inline __m256 assemble(__m256i k, __m256 f, __m256 tail, __m256 low) {
  const __m256 dk = _mm256_cvtepi32_ps(k);
  const __m256 small =
      _mm256_add_ps(_mm256_fmadd_ps(dk, splat(1.428606765330187e-06f), low), tail);
  return _mm256_fmadd_ps(dk, splat(0.693145751953125f), _mm256_add_ps(f, small));
}

inline __m256 log(__m256 x) {
  // subnormal x: scaled by 2^25 into the normal range, 25 taken off k
  const __m256 subnormal =
      _mm256_cmp_ps(x, splat(std::numeric_limits<float>::min()), _CMP_LT_OQ);
  const __m256 xs = blend(subnormal, _mm256_mul_ps(x, splat(33554432.0f)), x);
  __m256i k;
  const __m256 f = reduce(xs, k);
  k = _mm256_sub_epi32(k,
                       _mm256_and_si256(_mm256_castps_si256(subnormal), _mm256_set1_epi32(25)));
  __m256 result = assemble(k, f, log1p_reduced_tail(f), _mm256_setzero_ps());
  result = blend(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ),
                 splat(std::numeric_limits<float>::quiet_NaN()), result);
  result = blend(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ),
                 splat(-std::numeric_limits<float>::infinity()), result);
  // inf and nan give themselves
  return blend(_mm256_cmp_ps(x, splat(std::numeric_limits<float>::infinity()), _CMP_NLT_UQ), x,
               result);
}

// log1p(x) = log(u) + c, u = 1 + x rounded, c = (x - (u - 1)) / u the rounding error's share
// (for k >= 2, where u - 1 may round, 1 - (u - x) is the exact form); 0 from k = 25 on.
// c is formed as (x - (u - 1)) * (1 / u): the same 1 / (1 + x) as the sigmoid of
// BCE-with-logits, which the compiler then computes once.
inline __m256 log1p(__m256 x) {
  const __m256 one = splat(1.0f);
  const __m256 u = _mm256_add_ps(one, x);
  __m256i k;
  const __m256 f = reduce(u, k);
  const __m256i k_ge_2 = _mm256_cmpgt_epi32(k, _mm256_set1_epi32(1));
  const __m256 err = blend(_mm256_castsi256_ps(k_ge_2), _mm256_sub_ps(one, _mm256_sub_ps(u, x)),
                           _mm256_sub_ps(x, _mm256_sub_ps(u, one)));
  const __m256i k_lt_25 = _mm256_cmpgt_epi32(_mm256_set1_epi32(25), k);
  const __m256 c = _mm256_and_ps(_mm256_castsi256_ps(k_lt_25),
                                 _mm256_mul_ps(err, _mm256_div_ps(one, u)));
  __m256 result = assemble(k, f, log1p_reduced_tail(f), c);
  result = blend(_mm256_cmp_ps(x, splat(-1.0f), _CMP_LT_OQ),
                 splat(std::numeric_limits<float>::quiet_NaN()), result);
  result = blend(_mm256_cmp_ps(x, splat(-1.0f), _CMP_EQ_OQ),
                 splat(-std::numeric_limits<float>::infinity()), result);
  // 0 (either sign), inf and nan give themselves
  const __m256 itself = _mm256_or_ps(
      _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ),
      _mm256_cmp_ps(x, splat(std::numeric_limits<float>::infinity()), _CMP_NLT_UQ));
  return blend(itself, x, result);
}

}  // namespace avx2_math
#endif

template <typename S>
struct Math<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V exp(const V& x) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    if constexpr (std::is_same_v<S, float>) return V(avx2_math::exp(x));
#endif
    return x.exp();
  }
  static V log(const V& x) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    if constexpr (std::is_same_v<S, float>) return V(avx2_math::log(x));
#endif
    return x.log();
  }
  static V log1p(const V& x) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
    if constexpr (std::is_same_v<S, float>) return V(avx2_math::log1p(x));
#endif
    return x.log1p();
  }
  static V abs(const V& x) { return x.abs(); }
  static V where(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
  static V recip(const V& b) { return V(S(1)) / b; }
  static V div(const V& a, const V& b) { return a / b; }
  static V log_unit(const V& x) { return log(x); }
  static V log1m_unit(const V& x) { return log1p(x.neg()); }
  static V param_recip(const V&) { return V(S(0)); }
  static V div_by_param(const V& a, const V& b, const V&) { return a / b; }
  static V mul_rn(const V& a, const V& b) { return a * b; }  // (no contraction on the CPU)
  // exp within 20 ulp for float (at::vec's polynomial, no Sleef call): for softmax gradients.
  // The polynomial does not keep a NaN (issue 7: a NaN logit gave inf gradients): blended back.
  static V fast_exp(const V& x) {
    if constexpr (std::is_same_v<S, float>) {
      return V::blendv(x.exp_u20(), x, x != x);
    } else {
      return x.exp();
    }
  }
};

// The larger of a and b, NaN if either is NaN (as torch's max).
template <typename T>
T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// Calls f(i, v) in order for the vectors v = x[i, i + Vec::size()) in the accumulation type
// (half and bfloat16 converted in registers, two float vectors per load); returns the first
// index not visited, where the scalar tail starts.
template <typename scalar_t, class F>
int64_t for_each_acc_vec(const scalar_t* x, int64_t n, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + Vec::size() <= n; i += Vec::size()) f(i, Vec::loadu(x + i));
  } else {
    using VecS = at::vec::Vectorized<scalar_t>;
    static_assert(VecS::size() == 2 * Vec::size());
    for (; i + VecS::size() <= n; i += VecS::size()) {
      const auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(x + i));
      f(i, lo);
      f(i + Vec::size(), hi);
    }
  }
  return i;
}

// max of x[0, n) in the accumulation type (-inf for n = 0), NaN if any element is NaN;
// vectorized.
template <typename scalar_t>
at::opmath_type<scalar_t> nan_max_of(const scalar_t* x, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  Vec mv(-std::numeric_limits<acc_t>::infinity());
  int64_t i = for_each_acc_vec(x, n, [&](int64_t, const Vec& v) { mv = at::vec::maximum(mv, v); });
  acc_t lanes[kLanes];
  mv.store(lanes);
  acc_t m = lanes[0];
  for (int64_t k = 1; k < kLanes; ++k) m = nan_max(m, lanes[k]);
  for (; i < n; ++i) m = nan_max(m, static_cast<acc_t>(x[i]));
  return m;
}

// v into p with a non-temporal store (p aligned to the vector's size): the line is not read
// first nor kept in cache. For outputs far larger than the caches, written once.
template <typename T>
inline void stream_store(T* p, const at::vec::Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  if constexpr (std::is_same_v<T, float>) {
    _mm256_stream_ps(p, v);
  } else if constexpr (std::is_same_v<T, double>) {
    _mm256_stream_pd(p, v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  }
#else
  v.store(p);
#endif
}

// Orders this thread's non-temporal stores before its later stores (a task's end).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  _mm_sfence();
#endif
}

// src[0, n) converted to the accumulation type (float for half and bfloat16).
template <typename scalar_t, typename acc_t>
void convert_to_acc(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
    using VecS = at::vec::Vectorized<scalar_t>;
    constexpr int64_t kHalfLanes = VecS::size() / 2;
    int64_t i = 0;
    for (; i + VecS::size() <= n; i += VecS::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(VecS::loadu(src + i));
      lo.store(dst + i);
      hi.store(dst + i + kHalfLanes);
    }
    for (; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  } else {
    at::vec::convert(src, dst, n);
  }
}

}  // namespace torch_losses
