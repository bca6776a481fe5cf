// The pointwise losses, each written once. T is the value type the kernel computes in: float or
// double (CPU scalar code and CUDA), or an at::vec::Vectorized of them (CPU vector code).
//
// Every functor has
//   shared(x, y)             a term the three below share, computed once per element
//   value(x, y, a, s)        the unweighted, unreduced loss of one element
//   grad_input(x, y, a, s)   d value / d x
//   grad_target(x, y, a, s)  d value / d y
// where x is the input, y the target, a the per-element auxiliary weight (pos_weight for
// BCE-with-logits; 1 for the others) and s = shared(x, y). A functor that restricts its inputs
// sets kChecksDomain and gives invalid(x, y), true where an element is outside the domain, and
// kDomainError.
// The generic kernels apply the element weight, the reduction and grad_output.
// The losses with transcendental functions or divisions (BCE-with-logits, BCE, smooth-L1, the
// two KL divergences) take the math M as a second parameter: the alias of each
// (BCEWithLogits<T> = BCEWithLogitsUsing<T, Math<T>>) is what the CPU and the float/double CUDA
// kernels use; the bf16/fp16 CUDA kernels pass the MUFU-based math of
// csrc/cuda/pointwise_fast_math.cuh.
#pragma once

#include "losses/math.h"

namespace torch_losses {

struct NoDomainCheck {
  static constexpr bool kChecksDomain = false;
  static constexpr const char* kDomainError = "";
  template <typename T>
  TL_HD T invalid(T, T) const { return T(0); }
};

// binary_cross_entropy_with_logits: (1 - y) x - logsigmoid(x), or with a pos_weight tensor a:
// (1 - y) x - ((a - 1) y + 1) logsigmoid(x), in torch's order of operations, so that non-finite
// inputs give torch's inf or nan (a pos_weight of 1 is not the same as none: 0 * inf). The
// parameter says whether a pos_weight tensor is given (the kernels pass a = 1 without one).
template <typename T, typename M>
struct BCEWithLogitsUsing : NoDomainCheck {
  bool pos_weight;
  explicit TL_HD BCEWithLogitsUsing(double has_pos_weight) : pos_weight(has_pos_weight != 0) {}
  // log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): finite for any finite x.
  TL_HD static T log_sigmoid(T x, T e) { return M::where(x < T(0), x, T(0)) - M::log1p(e); }
  TL_HD T shared(T x, T) const { return M::exp(-M::abs(x)); }
  TL_HD T value(T x, T y, T a, T e) const {
    const T ls = log_sigmoid(x, e);
    return (T(1) - y) * x - (pos_weight ? ((a - T(1)) * y + T(1)) * ls : ls);
  }
  TL_HD T grad_input(T x, T y, T a, T e) const {
    const T r = M::recip(T(1) + e);  // 1 + e in [1, 2] (FastMath::recip's domain)
    const T sigmoid = M::where(x >= T(0), r, e * r);
    return pos_weight ? (a * y + T(1) - y) * sigmoid - a * y : sigmoid - y;
  }
  // -x, or logsigmoid(-x) - a logsigmoid(x) with pos_weight (the same for finite x; torch's
  // form gives inf, not inf - inf, at x = -inf). e = exp(-|x|) serves both log-sigmoids.
  TL_HD T grad_target(T x, T, T a, T e) const {
    return pos_weight ? log_sigmoid(-x, e) - a * log_sigmoid(x, e) : -x;
  }
};
template <typename T>
using BCEWithLogits = BCEWithLogitsUsing<T, Math<T>>;

// huber_loss: 0.5 z^2 if |z| < delta else delta (|z| - 0.5 delta), z = x - y.
template <typename T>
struct Huber : NoDomainCheck {
  using M = Math<T>;
  T delta;
  explicit TL_HD Huber(double delta_) : delta(T(delta_)) {}
  TL_HD T shared(T x, T y) const { return x - y; }
  TL_HD T value(T, T, T, T z) const {
    T az = M::abs(z);
    return M::where(az < delta, T(0.5) * z * z, delta * (az - T(0.5) * delta));
  }
  // clamp(z, -delta, delta), NaN passing through as in torch.
  TL_HD T grad_input(T, T, T, T z) const {
    return M::where(z < -delta, -delta, M::where(z > delta, delta, z));
  }
  TL_HD T grad_target(T x, T y, T a, T z) const { return -grad_input(x, y, a, z); }
};

// smooth_l1_loss: 0.5 z^2 / beta if |z| < beta else |z| - 0.5 beta, for beta > 0 (beta = 0 is
// l1_loss, where torch routes it: so do ops.h's smooth_l1 ops, to L1).
// The divisions by beta: M::div_by_param (the bf16/fp16 CUDA kernels: by a reciprocal taken
// once, corrected to the IEEE quotient's rounding; else a / beta).
template <typename T, typename M>
struct SmoothL1Using : NoDomainCheck {
  T beta, beta_recip;
  explicit TL_HD SmoothL1Using(double beta_)
      : beta(T(beta_)), beta_recip(M::param_recip(T(beta_))) {}
  TL_HD T shared(T x, T y) const { return x - y; }
  TL_HD T over_beta(T v) const { return M::div_by_param(v, beta, beta_recip); }
  TL_HD T value(T, T, T, T z) const {
    T az = M::abs(z);
    return M::where(az < beta, over_beta(T(0.5) * z * z), az - T(0.5) * beta);
  }
  TL_HD T grad_input(T, T, T, T z) const {
    return M::where(z < -beta, T(-1), M::where(z > beta, T(1), over_beta(z)));
  }
  TL_HD T grad_target(T x, T y, T a, T z) const { return -grad_input(x, y, a, z); }
};
template <typename T>
using SmoothL1 = SmoothL1Using<T, Math<T>>;

// mse_loss: z^2 (no 1/2 factor, as torch).
template <typename T>
struct MSE : NoDomainCheck {
  explicit TL_HD MSE(double = 0) {}
  TL_HD T shared(T x, T y) const { return x - y; }
  TL_HD T value(T, T, T, T z) const { return z * z; }
  TL_HD T grad_input(T, T, T, T z) const { return T(2) * z; }
  TL_HD T grad_target(T, T, T, T z) const { return T(-2) * z; }
};

// l1_loss: |z|; the subgradient at z = 0 is 0 (torch's sign).
template <typename T>
struct L1 : NoDomainCheck {
  using M = Math<T>;
  explicit TL_HD L1(double = 0) {}
  TL_HD static T sign(T z) { return M::where(z > T(0), T(1), M::where(z < T(0), T(-1), T(0))); }
  TL_HD T shared(T x, T y) const { return x - y; }
  TL_HD T value(T, T, T, T z) const { return M::abs(z); }
  TL_HD T grad_input(T, T, T, T z) const { return sign(z); }
  TL_HD T grad_target(T, T, T, T z) const { return -sign(z); }
};

// binary_cross_entropy on probabilities: -(y max(log x, -100) + (1 - y) max(log(1 - x), -100)).
template <typename T, typename M>
struct BCEUsing {
  static constexpr bool kChecksDomain = true;
  static constexpr const char* kDomainError =
      "binary_cross_entropy: all elements of input and target should be between 0 and 1";
  explicit TL_HD BCEUsing(double = 0) {}
  TL_HD static T clamp_log(T v) { return M::where(v < T(-100), T(-100), v); }
  // Outside [0, 1] or NaN, from ordered compares (which NaN fails): two per value, not three.
  TL_HD T invalid(T x, T y) const {
    return ((x >= T(0)) & (x <= T(1)) & (y >= T(0)) & (y <= T(1))) == T(0);
  }
  TL_HD T shared(T x, T) const { return M::log1m_unit(x); }  // log(1 - x)
  TL_HD T value(T x, T y, T, T log1m) const {
    return (y - T(1)) * clamp_log(log1m) - y * clamp_log(M::log_unit(x));
  }
  // (x - y) / max(x (1 - x), 1e-12), the bound a float 1e-12 as in torch (also for double).
  // The divisor lies in [1e-12, 0.25] (or is NaN): M::div's fast form holds there.
  TL_HD T grad_input(T x, T y, T, T) const {
    T d = x * (T(1) - x);
    return M::div(x - y, M::where(d < T(1e-12f), T(1e-12f), d));
  }
  // -logit(x), as torch (not clamped).
  TL_HD T grad_target(T x, T, T, T log1m) const { return log1m - M::log_unit(x); }
};
template <typename T>
using BCE = BCEUsing<T, Math<T>>;

// Binary SVM hinge: max(0, margin - y x), y in {-1, +1}. The gradients are those torch's
// autograd gives for (margin - y x).clamp_min(0): the mask (v >= 0, so the kink passes -y) times
// the inner derivative, so NaN/inf inputs give torch's 0 * inf = nan in the other gradient.
template <typename T>
struct Hinge {
  using M = Math<T>;
  static constexpr bool kChecksDomain = true;
  static constexpr const char* kDomainError = "hinge_loss: target values must be -1 or 1";
  T margin;
  explicit TL_HD Hinge(double margin_) : margin(T(margin_)) {}
  TL_HD T invalid(T, T y) const { return (y != T(1)) & (y != T(-1)); }
  TL_HD T shared(T x, T y) const { return margin - y * x; }
  TL_HD T value(T, T, T, T v) const { return M::where(v < T(0), T(0), v); }  // NaN propagates
  TL_HD static T pass(T v) { return M::where(v >= T(0), T(1), T(0)); }
  TL_HD T grad_input(T, T y, T, T v) const { return pass(v) * -y; }
  TL_HD T grad_target(T x, T, T, T v) const { return pass(v) * -x; }
};

// kl_div with probability targets: xlogy(y, y) - y x. At y = 0 torch's target gradient is nan
// (xlogy's d/dother = self / other); it is reproduced.
template <typename T, typename M>
struct KLDivUsing : NoDomainCheck {
  explicit TL_HD KLDivUsing(double = 0) {}
  // log(y), 0 where y == 0 (xlogy's convention)
  TL_HD T shared(T, T y) const { return M::where(y == T(0), T(0), M::log(y)); }
  // Both products rounded, as torch's xlogy(y, y) - y x: where one overflows, torch's nan (an
  // FMA gave -inf where the loss is +1.8e38, y = 3e38, x = 88).
  TL_HD T value(T x, T y, T, T log_y) const { return M::mul_rn(y, log_y) - M::mul_rn(y, x); }
  TL_HD T grad_input(T, T y, T, T) const { return -y; }
  TL_HD T grad_target(T x, T y, T, T log_y) const { return log_y + y / y - x; }
};
template <typename T>
using KLDiv = KLDivUsing<T, Math<T>>;

// kl_div with log-probability targets: exp(y) (y - x).
template <typename T, typename M>
struct KLDivLogTargetUsing : NoDomainCheck {
  explicit TL_HD KLDivLogTargetUsing(double = 0) {}
  TL_HD T shared(T, T y) const { return M::exp(y); }
  TL_HD T value(T x, T y, T, T exp_y) const { return exp_y * (y - x); }
  TL_HD T grad_input(T, T, T, T exp_y) const { return -exp_y; }
  // exp(y) (y - x) + exp(y): the two branches of torch's autograd, summed as it does (so that
  // exp(y) = inf with y - x < 0 gives its nan)
  TL_HD T grad_target(T x, T y, T, T exp_y) const { return exp_y * (y - x) + exp_y; }
};
template <typename T>
using KLDivLogTarget = KLDivLogTargetUsing<T, Math<T>>;

}  // namespace torch_losses
