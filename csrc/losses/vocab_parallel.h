// Vocabulary-parallel cross-entropy: the formulas, once, for the CPU kernels (and any device
// kernel). Each rank holds logits x[n, c] for the classes [vocab_start, vocab_start + V_local)
// of a vocabulary of V classes.
//
// Pass 1 (op vocab_parallel_ce_stats), per row and rank, relative to the shard's own max m:
//   the kLocal* columns below.
// Between the passes (Python, O(N)): M = all-reduce MAX of m; every sum is moved to M
//   (s exp(m - M), gap + (M - m), shift + (M - m) * weight sum) and all-reduced with SUM; the
//   shard sizes V_local are summed along, giving V.
// Pass 2 (op vocab_parallel_ce_grad): per-row loss from the global sums alone, and the shard's
//   gradient from its logits and the global sums.
//
// Options: class weights w (1 when absent), label smoothing eps (keep = 1 - eps, spread =
// eps / V: the FULL vocabulary), probability targets t, z_loss z (adds z lse^2 per counted row),
// softcap (x = cap tanh(logit / cap) before the softmax).
#pragma once

#include "losses/math.h"

namespace torch_losses {
namespace vocab_parallel {

// Columns of the local statistics (N, kLocalColumns).
enum LocalColumn : int {
  kLocalMax = 0,          // m = max_c x_c over the shard (-inf for an empty shard)
  kLocalSumExp,           // sum_c exp(x_c - m)
  kLocalTargetGap,        // m - x_y where this shard holds the (not ignored) target y, else 0
  kLocalTargetWeight,     // w_y where this shard holds the target, else 0
  kLocalProbWeight,       // probability targets: sum_c w_c t_c
  kLocalProbShift,        // probability targets: sum_c w_c t_c (m - x_c)
  kLocalClassWeight,      // label smoothing or probability targets: sum_c w_c
  kLocalClassShift,       // label smoothing or probability targets: sum_c w_c (m - x_c)
  kLocalOwned,            // 1 where this shard holds the (not ignored) target, else 0
  kLocalColumns
};

// Columns of the global sums (N, kSumColumns): the local ones after the move to the global max
// M and the SUM all-reduce (the max itself travels apart).
enum SumColumn : int {
  kSumExp = 0,      // S = sum over the vocabulary of exp(x_c - M)
  kTargetGap,       // M - x_y
  kTargetWeight,    // w_y (0 for an ignored row): the 'mean' denominator's term
  kProbWeight,      // sum_c w_c t_c
  kProbShift,       // sum_c w_c t_c (M - x_c)
  kClassWeight,     // sum_c w_c
  kClassShift,      // sum_c w_c (M - x_c)
  kOwned,           // how many shards hold the target: 1 unless the target is out of bounds
  kSumColumns
};

TL_HD float tanh_of(float x) { return tanhf(x); }
TL_HD double tanh_of(double x) { return ::tanh(x); }

template <typename T>
TL_HD T softcapped(T logit, T cap) {
  return cap > T(0) ? cap * tanh_of(logit / cap) : logit;
}

// d x / d logit for x = cap tanh(logit / cap), from x itself.
template <typename T>
TL_HD T softcap_slope(T x, T cap) {
  if (!(cap > T(0))) return T(1);
  const T r = x / cap;
  return T(1) - r * r;
}

// The global statistics of one row, with the coefficients its loss and gradient share.
template <typename T>
struct GlobalRow {
  T max, log_sum;  // lse = max + log_sum
  T keep, spread, z_loss;
  const T* sums;   // the row's kSumColumns values

  TL_HD T lse() const { return max + log_sum; }
  // sum_c v_c (lse - x_c) for v_c = w_c [class y, kept] or w_c t_c (probabilities)
  TL_HD T target_term(bool probs) const {
    return probs ? sums[kProbWeight] * log_sum + sums[kProbShift]
                 : sums[kTargetWeight] * (sums[kTargetGap] + log_sum);
  }
  TL_HD T smoothing_term() const { return sums[kClassWeight] * log_sum + sums[kClassShift]; }
  TL_HD T loss(bool probs) const {
    T l = keep * target_term(probs);
    if (spread != T(0)) l += spread * smoothing_term();
    if (z_loss != T(0)) l += z_loss * lse() * lse();
    return l;
  }
  // The gradient is (softmax_coefficient() p_c - v'_c) times the scale and the softcap slope,
  // v'_c = keep w_c [c = y] + spread w_c (class index) or w_c (keep t_c + spread).
  TL_HD T softmax_coefficient(bool probs) const {
    T a = keep * (probs ? sums[kProbWeight] : sums[kTargetWeight]);
    if (spread != T(0)) a += spread * sums[kClassWeight];
    if (z_loss != T(0)) a += T(2) * z_loss * lse();
    return a;
  }
  // The same under the gradient's scale s: for probability targets NaN where s is not finite
  // (prob_softmax_coef, as torch's composite).
  TL_HD T softmax_coefficient(bool probs, T s) const {
    const T a = softmax_coefficient(probs);
    return probs ? prob_softmax_coef(a, s) : a;
  }
  // The target's entry (class index): keep w_y (p_y - 1) formed before the other terms, times
  // the scale s and the softcap slope; NaN where s or s keep w_y is not finite, as torch's
  // log-softmax backward (inf - inf). w: the target class's weight.
  TL_HD T target_grad(T p, T wy, T coefficient, T w, T s, T slope) const {
    const T d = keep * wy * (p - T(1)) + (coefficient - keep * wy) * p - smoothing_share(w);
    return nan_unless_finite(nan_unless_finite(s * d * slope, s), s * keep * wy);
  }
  // spread w_c, a class's share of the smoothing in the gradient: 0 without smoothing, whatever
  // w_c is (an inf or NaN class weight then reaches the rows of its own class only, as torch's;
  // spread 0 times it was NaN in every row).
  TL_HD T smoothing_share(T w) const { return spread != T(0) ? spread * w : T(0); }
  TL_HD T softmax(T x) const { return Math<T>::exp((x - max) - log_sum); }
  // -log_softmax of a class with (capped) logit x
  TL_HD T nll(T x) const { return (max - x) + log_sum; }
};

}  // namespace vocab_parallel
}  // namespace torch_losses
