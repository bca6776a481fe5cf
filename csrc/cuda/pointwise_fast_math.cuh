// The math of the bf16/fp16 pointwise kernels: float, on the MUFU unit (ex2.approx, lg2.approx)
// where that cannot change what the result rounds to in 8 or 11 bits. Each function's error
// bound (the CUDA C++ Programming Guide's for __expf and __logf) is at most ~2^-15 relative in
// the ranges where a bf16/fp16 result can be nonzero; tests/test_cuda_emu_fast_math.py runs
// the kernels with these bounds applied in either direction (the emulator's shims) against
// torch. Unlike __expf/__logf, subnormal inputs and results are kept (the .ftz forms flush
// them; bf16 has float's subnormals).
#pragma once

#include "cuda/common.cuh"
#include "losses/math.h"

namespace torch_losses {
namespace cuda {

// exp(x) = 2^(x log2 e): one multiply and MUFU.EX2. Error <= 2 + floor(|1.173 x|) ulp (the
// bound of __expf, the same computation; the rounding of x log2 e grows with |x|).
TL_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("ex2.approx.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
  return r;
#elif defined(TL_CUDA_EMULATOR)
  return tl_emu::approx_exp(x, /*ftz=*/false);
#else
  return expf(x);  // the host pass of nvcc: never called
#endif
}

// log(x) = log2(x) ln 2 on MUFU.LG2: absolute error <= 2^-21.41 for x in [0.5, 2], else 3 ulp
// (the bound of __logf). kFtz: lg2.approx.ftz.f32, for arguments that are never subnormal
// (MUFU.LG2 flushes them; the plain form costs 4 instructions to scale them up first).
template <bool kFtz = false>
TL_HD float approx_log(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  if (kFtz) asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  else asm("lg2.approx.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r * 0.6931471805599453f;
#elif defined(TL_CUDA_EMULATOR)
  return tl_emu::approx_log(x, kFtz);
#else
  return logf(x);
#endif
}

// log(1 + d) for |d| < 2^-6, where approx_log's absolute error would be a large relative one:
// the series to d^4 (truncation < d^4 / 5 < 2^-26 relative).
TL_HD float log1p_series(float d) {
  return d * fmaf(d, fmaf(d, fmaf(d, -0.25f, 0.33333334f), -0.5f), 1.0f);
}

// log1p(u): the series for |u| < 2^-6, else approx_log(1 + u). Relative error <= 2^-15
// (approx_log's 2^-21.41 over |log1p(u)| >= 0.0155, plus the rounding of 1 + u). 1 + u in
// float is never subnormal, for any u: an exact sum below 2^-126 needs u within 2^-126 of -1,
// where floats are multiples of 2^-24, so the sum is 0; else rounding keeps it >= 2^-126. So
// the flushing lg2 gives the same bits.
TL_HD float fast_log1p(float u) {
  const float r = approx_log<true>(1.0f + u);
  return fabsf(u) < 0.015625f ? log1p_series(u) : r;
}

// log(x): near 1 (|x - 1| < 2^-6, where x - 1 is exact) the series of x - 1, else approx_log.
TL_HD float fast_log(float x) {
  const float d = x - 1.0f;
  const float r = approx_log(x);
  return fabsf(d) < 0.015625f ? log1p_series(d) : r;
}

// 1 / b for b in [1, 2], bit for bit the IEEE quotient: nvcc's own fast path of 1.0f / b
// (MUFU.RCP refined by one FMA step, r + r (1 - b r)) without the exponent check, branch and
// slow-path call around it, which only operands near float's range ends take (bf16
// BCE-with-logits: 53.2 -> 48.4 SASS instructions per element).
TL_HD float recip_1_to_2(float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  return fmaf(r, fmaf(-b, r, 1.0f), r);
#else
  return 1.0f / b;
#endif
}

// log x and log(1 - x) for x in [0, 1] (BCE's two logs), as fast_log(x) and fast_log1p(-x)
// but sharing one series: log x needs it for x > 1 - 2^-6 (of x - 1), log(1 - x) for x < 2^-6
// (of -x), never both, so its argument is picked by x >= 1/2 and it is formed once per element
// (opaque, so that nvcc neither repeats it under each use's predicate nor merges it away).
TL_HD float unit_series(float x) {
  float s = log1p_series(x >= 0.5f ? x - 1.0f : -x);
#if defined(__CUDA_ARCH__)
  asm("" : "+f"(s));
#endif
  return s;
}
TL_HD float fast_log_unit(float x) {
  const float r = approx_log(x), s = unit_series(x);
  return fabsf(x - 1.0f) < 0.015625f ? s : r;
}
TL_HD float fast_log1m_unit(float x) {
  const float r = approx_log<true>(1.0f - x);  // 1 - x: 0 or >= 2^-24, never subnormal
  const float s = unit_series(x);
  return fabsf(x) < 0.015625f ? s : r;
}

// 1 / b on MUFU.RCP, 1 ulp (PTX ISA), for |b| in [2^-126, 2^126] (b is never subnormal there,
// so the flushing form gives the same).
TL_HD float rcp_normal(float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  return r;
#elif defined(TL_CUDA_EMULATOR)
  return tl_emu::approx_rcp(b);
#else
  return 1.0f / b;  // the host pass of nvcc: never called
#endif
}

// a / b from r = rcp_normal(b), for a quotient that neither overflows nor is subnormal: q0 = a r
// and one correction from its residual, fma(a - b q0, r, q0). Before the last rounding that is
// the quotient within (q - q0) 2^-23, so the IEEE quotient wherever that is representable (the
// ties of a 16-bit result are: z / 0.3 is one for a sixth of the fp16 z below 0.3, where an
// uncorrected a r rounds the other way) and elsewhere unless within 2^-22 ulp of a float
// midpoint. With the reciprocal, 4 instructions where nvcc's IEEE division costs ~10 (its
// exponent check, branch and slow-path call). A subnormal quotient (smooth-L1's tiny z) loses
// at most a few of float's subnormal ulps, 2^-16 of bf16's. The emulator runs it on its
// rcp_normal, 1/b moved by the ulp in the direction the fast-math tests set.
TL_HD float div_corrected(float a, float b, float r) {
  const float q0 = a * r;
  return fmaf(fmaf(-b, q0, a), r, q0);
}

// The Math policy of the bf16/fp16 pointwise losses (losses/pointwise.h). recip: only for
// divisors in [1, 2] (BCE-with-logits' 1 + exp(-|x|)). div: only for |b| in [2^-126, 2^126]
// (BCE's max(x (1 - x), 1e-12)). param_recip / div_by_param: a loss parameter b of any value
// (smooth-L1's beta), its reciprocal taken once per thread; 0 where b is outside that range,
// which then takes the IEEE division.
struct FastMath : Math<float> {
  TL_HD static float exp(float x) { return fast_exp(x); }
  TL_HD static float log(float x) { return fast_log(x); }
  TL_HD static float log1p(float x) { return fast_log1p(x); }
  TL_HD static float recip(float b) { return recip_1_to_2(b); }
  TL_HD static float div(float a, float b) { return div_corrected(a, b, rcp_normal(b)); }
  TL_HD static float log_unit(float x) { return fast_log_unit(x); }
  TL_HD static float log1m_unit(float x) { return fast_log1m_unit(x); }
  TL_HD static float param_recip(float b) {
    const float ab = fabsf(b);
    return ab >= 1.17549435e-38f && ab <= 8.50705917e37f ? rcp_normal(b) : 0.0f;
  }
  TL_HD static float div_by_param(float a, float b, float r) {
    return r != 0.0f ? div_corrected(a, b, r) : a / b;
  }
};

}  // namespace cuda
}  // namespace torch_losses
