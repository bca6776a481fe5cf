// AVX-512 versions of the three sweeps of a cross-entropy row whose class-index gradient is
// wanted (csrc/cpu/cross_entropy_cpu.cpp: max, exp into a float row, scale into the gradient),
// 16 floats per instruction where the AVX2 build does 8: that row is compute-bound at 2 threads.
// Only these functions are compiled for AVX-512 (a target attribute each, internal linkage);
// the rest of the extension stays an AVX2 build, and they run only where torch's own kernels
// run AVX-512 (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY=avx2).
// Same formulas as the AVX2 sweeps: exp is avx2_math::exp's algorithm lane for lane, and the
// 16-bit roundings are at::vec's; the sums have 16 lanes instead of 8 (other last bits).
#pragma once

#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/vec_math.h"

#if defined(__x86_64__) && !defined(_MSC_VER)
#include <immintrin.h>
#define TL_HAVE_AVX512_ROWS 1
#define TL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#endif

namespace torch_losses {
namespace avx512_rows {
namespace {

// Whether the AVX-512 sweeps run here (decided once).
inline bool enabled() {
#if defined(TL_HAVE_AVX512_ROWS)
  static const bool on = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq") && at::get_cpu_capability() == "AVX512";
  return on;
#else
  return false;
#endif
}

// e_c = exp(x_c - max) summed, and (kWeighted) the label-smoothing sums of v_c (w_c, or 1).
struct ExpSums {
  float sum = 0;
  float weight = 0;
  float shifted = 0;
};

#if defined(TL_HAVE_AVX512_ROWS)
constexpr int64_t kLanes = 16;

TL_AVX512 inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
TL_AVX512 inline __m512 load(const at::BFloat16* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
TL_AVX512 inline __m512 load(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 floats rounded to nearest even into 16-bit (NaN: 0xffff for bfloat16), as at::vec's AVX2
// conversions.
TL_AVX512 inline __m256i round_to_16bit(__m512 v, const at::BFloat16*) {
  const __m512i i = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(i, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)), i);
  r = _mm512_srli_epi32(r, 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xffff));
  return _mm512_cvtepi32_epi16(r);
}
TL_AVX512 inline __m256i round_to_16bit(__m512 v, const at::Half*) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

TL_AVX512 inline void store(float* p, __m512 v, bool stream) {
  stream ? _mm512_stream_ps(p, v) : _mm512_storeu_ps(p, v);
}
template <typename T>
TL_AVX512 inline void store(T* p, __m512 v, bool stream) {
  const __m256i h = round_to_16bit(v, p);
  auto* q = reinterpret_cast<__m256i*>(p);
  stream ? _mm256_stream_si256(q, h) : _mm256_storeu_si256(q, h);
}

// avx2_math::exp (csrc/cpu/vec_math.h) on 16 lanes: the same operations on the same constants
// (exp_poly), the same results. (One template for both widths would carry this function's
// AVX-512 target into the AVX2 build.)
TL_AVX512 inline __m512 splat(float v) { return _mm512_set1_ps(v); }
TL_AVX512 inline __m512 exp(__m512 x) {
  using namespace exp_poly;
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, splat(kLowest)), splat(kHighest));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, splat(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, splat(kLn2Hi), xc);
  r = _mm512_fnmadd_ps(n, splat(kLn2Lo), r);
  __m512 p = splat(kR8);
  p = _mm512_fmadd_ps(p, r, splat(kR7));
  p = _mm512_fmadd_ps(p, r, splat(kR6));
  p = _mm512_fmadd_ps(p, r, splat(kR5));
  p = _mm512_fmadd_ps(p, r, splat(kR4));
  p = _mm512_fmadd_ps(p, r, splat(kR3));
  p = _mm512_fmadd_ps(p, r, splat(kR2));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  const __m512i ni = _mm512_cvtps_epi32(n);
  const __m512i n1 = _mm512_srai_epi32(ni, 1), n2 = _mm512_sub_epi32(ni, n1);
  const __m512i bias = _mm512_set1_epi32(127);
  const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, bias), 23));
  const __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, bias), 23));
  const __m512 result = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
  return _mm512_mask_mov_ps(result, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

TL_AVX512 inline float nan_max_scalar(float a, float b) { return (a != a || a > b) ? a : b; }

// max of x[0, n) in float, NaN if any element is NaN (-inf for n = 0).
template <typename T>
TL_AVX512 float nan_max(const T* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const __m512 v = load(x + i);
    m = _mm512_max_ps(m, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  float r = nan ? NAN : _mm512_reduce_max_ps(m);
  for (; i < n; ++i) r = nan_max_scalar(r, static_cast<float>(x[i]));
  return r;
}

// e[0, C) = exp(x - max) and their sums; next_row (or null) prefetched a line at a time.
template <bool kWeighted, typename T>
TL_AVX512 ExpSums exp_sweep(const T* x, const float* w, int64_t C, float max, float* e,
                            const T* next_row) {
  constexpr int64_t kLineElements = 64 / sizeof(T);
  const __m512 max_v = _mm512_set1_ps(max);
  __m512 sv = _mm512_setzero_ps(), vw = _mm512_setzero_ps(), vs = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + kLanes <= C; i += kLanes) {
    if (next_row && i % kLineElements == 0) __builtin_prefetch(next_row + i, 0, 2);
    const __m512 d = _mm512_sub_ps(load(x + i), max_v);
    const __m512 ev = exp(d);
    if constexpr (kWeighted) {
      const __m512 v = w ? _mm512_loadu_ps(w + i) : _mm512_set1_ps(1.0f);
      vw = _mm512_add_ps(vw, v);
      vs = _mm512_add_ps(vs, _mm512_mul_ps(v, d));
    }
    _mm512_storeu_ps(e + i, ev);
    sv = _mm512_add_ps(sv, ev);
  }
  ExpSums s;
  float tail = 0;
  for (; i < C; ++i) {
    const float d = static_cast<float>(x[i]) - max;
    e[i] = std::exp(d);
    tail += e[i];
    if constexpr (kWeighted) {
      const float v = w ? w[i] : 1.0f;
      s.weight += v;
      s.shifted += v * d;
    }
  }
  // Lane sums in lane order after the tail, as the AVX2 sweep.
  alignas(64) float lanes[kLanes];
  _mm512_store_ps(lanes, sv);
  s.sum = tail;
  for (float l : lanes) s.sum += l;
  _mm512_store_ps(lanes, vw);
  for (float l : lanes) s.weight += l;
  _mm512_store_ps(lanes, vs);
  for (float l : lanes) s.shifted += l;
  return s;
}

// grad_c = a e_c - b w_c (b w_c = b without weights), rounded to T; `stream`: non-temporal
// stores from the first vector-aligned element on.
template <typename T>
TL_AVX512 void scale_sweep(const float* w, const float* e, T* grad, int64_t C, float a, float b,
                           bool stream) {
  const auto grad_at = [&](int64_t j) {  // b = 0: w_c not read, as the vector loop
    return static_cast<T>(b != 0 ? a * e[j] - b * (w ? w[j] : 1.0f) : a * e[j]);
  };
  constexpr int64_t kVecBytes = kLanes * sizeof(T);
  int64_t i = stream ? std::min<int64_t>(C, (-reinterpret_cast<intptr_t>(grad) & (kVecBytes - 1)) /
                                                 int64_t(sizeof(T)))
                     : 0;
  for (int64_t j = 0; j < i; ++j) grad[j] = grad_at(j);
  const __m512 a_v = _mm512_set1_ps(a), b_v = _mm512_set1_ps(b);
  for (; i + kLanes <= C; i += kLanes) {
    __m512 g = _mm512_mul_ps(a_v, _mm512_loadu_ps(e + i));
    if (b != 0) g = _mm512_sub_ps(g, w ? _mm512_mul_ps(b_v, _mm512_loadu_ps(w + i)) : b_v);
    store(grad + i, g, stream);
  }
  for (; i < C; ++i) grad[i] = grad_at(i);
  if (stream) _mm_sfence();  // before the target's entry is stored over them
}

// The class sweeps of 16 positions of an (N, C, D) input (IndexColumns, cross_entropy_cpu.cpp):
// x points at class 0 of the first position, class c lies c D further.
// out[0, 16) = the max over the classes, NaN where a class is NaN.
template <typename T>
TL_AVX512 void column_max(const T* x, int64_t C, int64_t D, float* out) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t c = 0; c < C; ++c) {
    const __m512 v = load(x + c * D);
    m = _mm512_max_ps(m, v);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  _mm512_storeu_ps(out, _mm512_mask_mov_ps(m, nan, _mm512_set1_ps(NAN)));
}

// e[c 16 + j] = exp(x_c - max_j) and, per position, their sum (sums[0, 16)) and with kWeighted
// the label-smoothing sums of v_c = w_c (or 1) and v_c (x_c - max) (sums[16, 48)), in class order.
template <bool kWeighted, typename T>
TL_AVX512 void column_exp(const T* x, const float* w, int64_t C, int64_t D, const float* max,
                          float* e, float* sums) {
  const __m512 m = _mm512_loadu_ps(max);
  __m512 sv = _mm512_setzero_ps(), vw = _mm512_setzero_ps(), vs = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; ++c) {
    const __m512 d = _mm512_sub_ps(load(x + c * D), m);
    const __m512 ev = exp(d);
    _mm512_storeu_ps(e + c * kLanes, ev);
    sv = _mm512_add_ps(sv, ev);
    if constexpr (kWeighted) {
      const __m512 v = _mm512_set1_ps(w ? w[c] : 1.0f);
      vw = _mm512_add_ps(vw, v);
      vs = _mm512_add_ps(vs, _mm512_mul_ps(v, d));
    }
  }
  _mm512_storeu_ps(sums, sv);
  _mm512_storeu_ps(sums + kLanes, vw);
  _mm512_storeu_ps(sums + 2 * kLanes, vs);
}

// grad_c = a e_c - b w_c (b w_c = b without weights; `smoothing` off: a e_c), rounded to T,
// ignored_value where `ignored` is set.
template <typename T>
TL_AVX512 void column_grad(const float* w, const float* e, T* grad, int64_t C, int64_t D,
                           const float* a, const float* b, const float* ignored_value,
                           __mmask16 ignored, bool smoothing) {
  const __m512 av = _mm512_loadu_ps(a), bv = _mm512_loadu_ps(b);
  const __m512 iv = _mm512_loadu_ps(ignored_value);
  for (int64_t c = 0; c < C; ++c) {
    __m512 gv = _mm512_mul_ps(av, _mm512_loadu_ps(e + c * kLanes));
    if (smoothing) gv = _mm512_sub_ps(gv, _mm512_mul_ps(bv, _mm512_set1_ps(w ? w[c] : 1.0f)));
    store(grad + c * D, _mm512_mask_mov_ps(gv, ignored, iv), false);
  }
}
// Tiles of 16 short rows (IndexColumns::row_block): rows_to_tile writes class c of row j
// (rows + j C + c) to tile[c 16 + j], tile_to_rows the reverse; 16 classes at a time through a
// 16 x 16 transpose in registers (16-bit values widened to 32-bit lanes, bit for bit), the last
// C % 16 with masks. The scalar loops they replace were half of a (262144, 21) step.
TL_AVX512 inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 2]);
    const __m512d c = _mm512_castps_pd(t[i + 1]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  // r[4q + k] holds, in 128-bit lane l, rows 4q..4q+3 of class 4l + k
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd);
  }
}

// n <= 16 values at p as 32-bit lanes (the rest 0), and back.
TL_AVX512 inline __m512 load_lanes(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
template <typename T>
TL_AVX512 inline __m512 load_lanes(const T* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)));
}
TL_AVX512 inline void store_lanes(float* p, __mmask16 m, __m512 v) {
  _mm512_mask_storeu_ps(p, m, v);
}
template <typename T>
TL_AVX512 inline void store_lanes(T* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_castps_si512(v)));
}

template <typename T>
TL_AVX512 void rows_to_tile(const T* rows, int64_t C, T* tile) {
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const int64_t n = C - c0 < 16 ? C - c0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    __m512 r[16];
    for (int j = 0; j < 16; ++j) r[j] = load_lanes(rows + j * C + c0, m);
    transpose16(r);
    for (int64_t k = 0; k < n; ++k) store_lanes(tile + (c0 + k) * 16, 0xFFFF, r[k]);
  }
}

template <typename T>
TL_AVX512 void tile_to_rows(const T* tile, int64_t C, T* rows) {
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const int64_t n = C - c0 < 16 ? C - c0 : 16;
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    __m512 r[16];
    for (int64_t k = 0; k < 16; ++k) {
      r[k] = k < n ? load_lanes(tile + (c0 + k) * 16, 0xFFFF) : _mm512_setzero_ps();
    }
    transpose16(r);
    for (int j = 0; j < 16; ++j) store_lanes(rows + j * C + c0, m, r[j]);
  }
}
#endif

}  // namespace
}  // namespace avx512_rows
}  // namespace torch_losses
