// Scalar math shared by the CPU and CUDA kernels. Loss formulas are written once, as templates
// over a value type T; Math<T> supplies the few functions they need. This header defines it for
// float and double (host and device); csrc/cpu/vec_math.h adds the at::vec::Vectorized versions.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define TL_HD __host__ __device__ __forceinline__
#else
#define TL_HD inline
#endif

namespace torch_losses {

// The functions the loss functors compute with. div, log_unit / log1m_unit (x in [0, 1]) and
// param_recip / div_by_param (b a loss parameter) are the plain forms here; they exist for the
// bf16/fp16 CUDA policy (FastMath, csrc/cuda/pointwise_fast_math.cuh), which computes them
// faster with the same rounded results.
template <typename T>
struct Math;

template <>
struct Math<float> {
  TL_HD static float exp(float x) { return expf(x); }
  TL_HD static float log(float x) { return logf(x); }
  TL_HD static float log1p(float x) { return log1pf(x); }
  TL_HD static float abs(float x) { return fabsf(x); }
  TL_HD static float where(bool c, float a, float b) { return c ? a : b; }
  TL_HD static float recip(float b) { return 1.0f / b; }
  TL_HD static float div(float a, float b) { return a / b; }
  TL_HD static float log_unit(float x) { return logf(x); }       // x in [0, 1]
  TL_HD static float log1m_unit(float x) { return log1pf(-x); }  // log(1 - x), x in [0, 1]
  TL_HD static float param_recip(float) { return 0.0f; }
  TL_HD static float div_by_param(float a, float b, float) { return a / b; }
  // a * b rounded on its own, never contracted into an FMA with an add that follows (nvcc
  // contracts by default; the CPU build does not, -ffp-contract=off): where torch's composite
  // rounds the product, so that its overflows give torch's inf - inf = NaN.
  TL_HD static float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(TL_CUDA_EMULATOR)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
};

template <>
struct Math<double> {
  TL_HD static double exp(double x) { return ::exp(x); }
  TL_HD static double log(double x) { return ::log(x); }
  TL_HD static double log1p(double x) { return ::log1p(x); }
  TL_HD static double abs(double x) { return fabs(x); }
  TL_HD static double where(bool c, double a, double b) { return c ? a : b; }
  TL_HD static double recip(double b) { return 1.0 / b; }
  TL_HD static double div(double a, double b) { return a / b; }
  TL_HD static double log_unit(double x) { return ::log(x); }
  TL_HD static double log1m_unit(double x) { return ::log1p(-x); }
  TL_HD static double param_recip(double) { return 0.0; }
  TL_HD static double div_by_param(double a, double b, double) { return a / b; }
  TL_HD static double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__) || defined(TL_CUDA_EMULATOR)
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
  }
};

// x, or NaN where y is inf or NaN: y - y is +0 for a finite y (and x - +0 is x, signed zeros
// included), NaN otherwise; no branch, so it serves scalars and at::vec vectors alike. Where
// torch's backward multiplies a grad_output into several terms that it then subtracts, an
// infinite one gives inf - inf: the cross-entropy gradients use this to give torch's NaN.
template <typename T>
TL_HD T nan_unless_finite(T x, T y) {
  return x - (y - y);
}

// A probability-target gradient's softmax coefficient (sum_c w_c t'_c, plus the z-loss' share)
// under the gradient's scale s: NaN where s is inf or NaN. torch's composite forms
// s w_c t'_c - softmax_c sum_k s w_k t'_k, which is inf - inf (or a NaN product) in every class.
template <typename T>
TL_HD T prob_softmax_coef(T coef, T s) {
  return nan_unless_finite(coef, s);
}

// Reductions the functors' callers use.
enum Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

}  // namespace torch_losses
