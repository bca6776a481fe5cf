// Softmax cross-entropy on the CPU. The forward reads each position (row) once from memory for
// its statistics and saves them per row (max, log of the sum, and the target sum for probability
// targets). Without a class-index gradient: an online max and sum of exp, chunk by chunk. With
// one: a max sweep, then exp(x - max) written into the gradient row and summed, then that row
// scaled in place while it is in cache (row_stats_into_exp). The backward op reads the saved
// statistics and each row once.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/ce_rows_avx512.h"
#include "cpu/cpu_backend.h"
#include "cpu/vec_math.h"

namespace torch_losses {
namespace {

// The statistics of one row. The max and the log of the sum are kept apart, and the weighted
// sums are taken relative to the max, so that the loss and the softmax are formed from
// differences (x - max) as torch's log_softmax does: with logits of 1e4 in float32, max + log(sum)
// alone is 1e-3 off.
template <typename acc_t>
struct RowStats {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t log_sum = 0;   // log(sum_c exp(x_c - max))
  acc_t weight = 0;    // sum_c v_c
  acc_t shifted = 0;   // sum_c v_c (x_c - max): the label-smoothing loss' sum
  // -log_softmax of a class with logit x
  acc_t nll(acc_t x) const { return (max - x) + log_sum; }
  acc_t lse() const { return max + log_sum; }
};

// The statistics of x[0, C) in one online pass (a running max and sum of exp, block by block).
// When `weighted`, also the sums of v_c and v_c (x_c - max) with v_c = w_c t'_c (probability
// targets t, blended t' = keep t + spread) or v_c = w_c (class-index label smoothing); w may
// be null (1). A sum kept relative to a running max m is moved to a new max m' by subtracting
// (m' - m) sum v.
template <typename acc_t>
RowStats<acc_t> row_stats(const acc_t* x, const acc_t* w, const acc_t* t, int64_t C, acc_t keep,
                          acc_t spread, bool weighted) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  constexpr int64_t kBlock = 512;  // in L1 between the max and the exp sweeps
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t max = kNegInf;
  acc_t sum = 0;
  Vec vw(0), vs(0);  // per-lane sum v and sum v (x - ref)
  acc_t vw_tail = 0, vs_tail = 0;
  // The sums are relative to ref: the running max, or 0 while every logit so far is -inf.
  acc_t ref = 0;
  for (int64_t begin = 0; begin < C; begin += kBlock) {
    const int64_t len = std::min(kBlock, C - begin);
    const acc_t* xb = x + begin;
    const acc_t new_max = nan_max(max, nan_max_of(xb, len));
    if (new_max != max) {
      sum = max == kNegInf ? acc_t(0) : sum * std::exp(max - new_max);
      max = new_max;
      if (weighted && max != kNegInf) {
        const acc_t move = max - ref;
        vs = vs - vw * Vec(move);
        vs_tail -= vw_tail * move;
        ref = max;
      }
    }
    const Vec max_v(max), ref_v(ref);
    Vec sv(0);
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      const Vec xv = Vec::loadu(xb + i);
      sv = sv + Math<Vec>::exp(xv - max_v);
      if (weighted) {
        Vec v = w ? Vec::loadu(w + begin + i) : Vec(1);
        if (t) v = v * (Vec::loadu(t + begin + i) * Vec(keep) + Vec(spread));
        vw = vw + v;
        vs = vs + v * (xv - ref_v);
      }
    }
    acc_t lanes[kLanes];
    sv.store(lanes);
    acc_t block_sum = 0;
    for (int64_t k = 0; k < kLanes; ++k) block_sum += lanes[k];
    for (; i < len; ++i) {
      const acc_t xs = xb[i];
      block_sum += std::exp(xs - max);
      if (weighted) {
        acc_t v = w ? w[begin + i] : acc_t(1);
        if (t) v *= t[begin + i] * keep + spread;
        vw_tail += v;
        vs_tail += v * (xs - ref);
      }
    }
    sum += block_sum;
  }
  RowStats<acc_t> r;
  r.max = max;
  // An all -inf row (max -inf) gives nan, as torch's log_softmax.
  r.log_sum = max == kNegInf ? std::numeric_limits<acc_t>::quiet_NaN() : std::log(sum);
  acc_t lanes[kLanes];
  vw.store(lanes);
  r.weight = vw_tail;
  for (int64_t k = 0; k < kLanes; ++k) r.weight += lanes[k];
  vs.store(lanes);
  r.shifted = vs_tail;
  for (int64_t k = 0; k < kLanes; ++k) r.shifted += lanes[k];
  return r;
}

// The statistics of a class-index row whose gradient is wanted, with one exp per element: the
// max first (a light sweep that brings the row into cache), then e_c = exp(x_c - max) stored
// into `e` (the gradient row, which may alias x, or a float row in cache) and summed, with the
// label-smoothing sums (v_c = w_c, or 1) when kWeighted;
// row_grad_from_exp then scales e into the gradient. (row_stats' online pass and the gradient's
// softmax would take one exp each.) The backward op passes the saved max and uses only the
// e_c: the same bits as the forward's gradient. `next_row` (or null): the memory of the row
// this task reads next, prefetched into cache during the exp sweep (compute-bound, in cache)
// so that the next max sweep does not wait on memory.
template <bool kWeighted, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
RowStats<acc_t> row_stats_into_exp(const scalar_t* x, const acc_t* w, int64_t C, acc_t* e,
                                   const scalar_t* next_row, const acc_t* saved_max) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  RowStats<acc_t> r;
  r.max = saved_max ? *saved_max : nan_max_of(x, C);
  const Vec max_v(r.max);
  Vec sv(0), vw(0), vs(0);
  constexpr int64_t kLineElements = 64 / sizeof(scalar_t);
  int64_t i = for_each_acc_vec(x, C, [&](int64_t j, const Vec& xv) {
    if (next_row && j % kLineElements == 0) __builtin_prefetch(next_row + j, 0, 2);
    const Vec ev = Math<Vec>::exp(xv - max_v);
    if constexpr (kWeighted) {
      const Vec v = w ? Vec::loadu(w + j) : Vec(1);
      vw = vw + v;
      vs = vs + v * (xv - max_v);
    }
    ev.store(e + j);
    sv = sv + ev;
  });
  acc_t tail_sum = 0;
  for (; i < C; ++i) {
    const acc_t xs = static_cast<acc_t>(x[i]);
    e[i] = std::exp(xs - r.max);
    tail_sum += e[i];
    if constexpr (kWeighted) {
      const acc_t v = w ? w[i] : acc_t(1);
      r.weight += v;
      r.shifted += v * (xs - r.max);
    }
  }
  acc_t lanes[kLanes];
  sv.store(lanes);
  acc_t sum = tail_sum;
  for (int64_t k = 0; k < kLanes; ++k) sum += lanes[k];
  vw.store(lanes);
  for (int64_t k = 0; k < kLanes; ++k) r.weight += lanes[k];
  vs.store(lanes);
  for (int64_t k = 0; k < kLanes; ++k) r.shifted += lanes[k];
  // An all -inf row: exp(nan) terms and a nan sum, as torch's log_softmax.
  r.log_sum = std::log(sum);
  return r;
}

#if defined(TL_HAVE_AVX512_ROWS)
// row_stats_into_exp with the AVX-512 sweeps (csrc/cpu/ce_rows_avx512.h).
template <bool kWeighted, typename scalar_t>
RowStats<float> row_stats_into_exp_avx512(const scalar_t* x, const float* w, int64_t C, float* e,
                                          const scalar_t* next_row, const float* saved_max) {
  RowStats<float> r;
  r.max = saved_max ? *saved_max : avx512_rows::nan_max(x, C);
  const avx512_rows::ExpSums sums = avx512_rows::exp_sweep<kWeighted>(x, w, C, r.max, e, next_row);
  r.weight = sums.weight;
  r.shifted = sums.shifted;
  r.log_sum = std::log(sums.sum);
  return r;
}
#endif

// grad_c = a softmax_c - b w_c = (a / sum) e_c - b w_c from e_c = exp(x_c - max), into `grad`
// (in place when it is e; class-index targets; the target entry is fixed after). `stream`:
// non-temporal stores (grad is not e).
template <typename acc_t, typename scalar_t>
void row_grad_from_exp(const acc_t* w, const acc_t* e, scalar_t* grad, int64_t C,
                       acc_t a_over_sum, acc_t b, bool stream) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec scale_v(a_over_sum), b_v(b);
  const auto grad_vec = [&](int64_t j) {
    const Vec gv = scale_v * Vec::loadu(e + j);
    if (w && b != 0) return gv - b_v * Vec::loadu(w + j);
    return b != 0 ? gv - b_v : gv;
  };
  const auto grad_at = [&](int64_t j) {  // b = 0: w_c not read, as grad_vec
    return static_cast<scalar_t>(b != 0 ? a_over_sum * e[j] - b * (w ? w[j] : acc_t(1))
                                        : a_over_sum * e[j]);
  };
  using VecS = at::vec::Vectorized<scalar_t>;
  // A streamed row starts with single elements up to the first vector-aligned one.
  constexpr int64_t kVecBytes = sizeof(VecS);
  int64_t i = stream ? std::min<int64_t>(C, (-reinterpret_cast<intptr_t>(grad) & (kVecBytes - 1)) /
                                                 int64_t(sizeof(scalar_t)))
                     : 0;
  for (int64_t j = 0; j < i; ++j) grad[j] = grad_at(j);
  const auto store = [&](scalar_t* p, const VecS& v) { stream ? stream_store(p, v) : v.store(p); };
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; i + Vec::size() <= C; i += Vec::size()) store(grad + i, grad_vec(i));
  } else {  // two float vectors rounded into one vector of half or bfloat16
    for (; i + VecS::size() <= C; i += VecS::size()) {
      store(grad + i, at::vec::convert_from_float<scalar_t>(grad_vec(i), grad_vec(i + Vec::size())));
    }
  }
  for (; i < C; ++i) grad[i] = grad_at(i);
  if (stream) stream_fence();  // before the target's entry is stored over them
}

// Probability targets: sum_c v_c (-log_softmax_c), v_c = w_c t'_c, term by term as torch (an
// infinite target times the max's -log_softmax is inf, not inf * 0 from a split sum). A second
// sweep over the row, which is in cache.
template <typename acc_t>
acc_t row_target_nll(const acc_t* x, const acc_t* w, const acc_t* t, int64_t C,
                     const RowStats<acc_t>& st, acc_t keep, acc_t spread) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec max_v(st.max), log_sum_v(st.log_sum), keep_v(keep), spread_v(spread);
  Vec sum_v(0);
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    Vec v = Vec::loadu(t + i) * keep_v + spread_v;
    if (w) v = Vec::loadu(w + i) * v;
    sum_v = sum_v + v * ((max_v - Vec::loadu(x + i)) + log_sum_v);
  }
  acc_t lanes[Vec::size()];
  sum_v.store(lanes);
  acc_t sum = 0;
  for (int64_t k = 0; k < Vec::size(); ++k) sum += lanes[k];
  for (; i < C; ++i) sum += (w ? w[i] : acc_t(1)) * (t[i] * keep + spread) * st.nll(x[i]);
  return sum;
}

// exp((x - max) - log_sum) for a vector: the softmax without forming max + log_sum.
// The fast exp flushes results below float's normal range to 0; `exact` (a non-finite factor
// multiplies the softmax) keeps them, so that inf * 1e-44 is inf as in torch, not inf * 0.
template <typename acc_t>
at::vec::Vectorized<acc_t> softmax(const at::vec::Vectorized<acc_t>& x,
                                   const RowStats<acc_t>& st, bool exact) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec arg = (x - Vec(st.max)) - Vec(st.log_sum);
  return exact ? arg.exp() : Math<Vec>::fast_exp(arg);
}

template <typename acc_t>
acc_t softmax(acc_t x, const RowStats<acc_t>& st) {
  return std::exp((x - st.max) - st.log_sum);
}

// Probability targets: grad_x_c = s (softmax_c sum_c v_c - w_c t'_c),
// grad_t_c = s (1 - eps) w_c (-log_softmax_c). The difference is formed before the scale s
// (exactly 0 where torch's is: one class). The softmax's coefficient sum_c v_c is NaN where s
// is not finite (prob_softmax_coef).
template <typename acc_t>
void row_grad_probs(const acc_t* x, const acc_t* w, const acc_t* t, acc_t* gx, acc_t* gt,
                    int64_t C, const RowStats<acc_t>& st, acc_t s, acc_t keep, acc_t spread) {
  using Vec = at::vec::Vectorized<acc_t>;
  const acc_t coef = prob_softmax_coef(st.weight, s);
  const Vec weight_v(coef), s_v(s), keep_v(keep), spread_v(spread), gt_v(s * keep),
      max_v(st.max), log_sum_v(st.log_sum);
  const bool exact = !std::isfinite(coef);
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    const Vec xv = Vec::loadu(x + i);
    const Vec wv = w ? Vec::loadu(w + i) : Vec(1);
    if (gx) {
      const Vec tv = Vec::loadu(t + i) * keep_v + spread_v;
      (s_v * (weight_v * softmax(xv, st, exact) - wv * tv)).store(gx + i);
    }
    if (gt) (gt_v * wv * ((max_v - xv) + log_sum_v)).store(gt + i);
  }
  for (; i < C; ++i) {
    const acc_t ws = w ? w[i] : acc_t(1);
    if (gx) gx[i] = s * (coef * softmax(x[i], st) - ws * (t[i] * keep + spread));
    if (gt) gt[i] = s * keep * ws * st.nll(x[i]);
  }
}

// Row r = (n, d) of an (N, C, D) tensor in the accumulation type: the memory itself when it
// is contiguous and of that type, else a gathered and converted copy in `buffer`.
template <typename acc_t, typename scalar_t>
const acc_t* load_row(const scalar_t* base, int64_t C, int64_t D, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (D == 1) return base;
  }
  if (D == 1) {
    convert_to_acc(base, buffer, C);
  } else {
    for (int64_t c = 0; c < C; ++c) buffer[c] = static_cast<acc_t>(base[c * D]);
  }
  return buffer;
}

template <typename acc_t, typename scalar_t>
acc_t* row_out(scalar_t* base, int64_t D, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (D == 1) return base;
  }
  return buffer;
}

template <typename acc_t, typename scalar_t>
void store_row(scalar_t* base, int64_t C, int64_t D, const acc_t* row) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    if (D == 1) return;  // written in place
  }
  if (D == 1) {
    at::vec::convert(row, base, C);
  } else {
    for (int64_t c = 0; c < C; ++c) base[c * D] = static_cast<scalar_t>(row[c]);
  }
}

// Soft-capping (issue 9): out_c = cap tanh(x_c / cap), in place when out == x.
template <typename acc_t>
void softcap_row(const acc_t* x, acc_t* out, int64_t C, acc_t cap) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec cap_v(cap), inv_v(acc_t(1) / cap);
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    (cap_v * (Vec::loadu(x + i) * inv_v).tanh()).store(out + i);
  }
  for (; i < C; ++i) out[i] = cap * std::tanh(x[i] * (acc_t(1) / cap));
}

// The chain rule through the cap: grad_c *= 1 - t_c^2, t_c = capped_c / cap, as (1 - t)(1 + t)
// (1 - t exact near |t| = 1). A quotient, not times 1 / cap: a saturated tanh (t = 1, capped =
// cap) comes back as exactly 1 and its factor 0, as torch's 1 - tanh^2 (the rounded 1 / cap
// gave 1 - 2^-24 for some caps: a factor 1.2e-7).
template <typename acc_t>
void softcap_grad_row(const acc_t* capped, acc_t* grad, int64_t C, acc_t cap) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec one(1), cap_v(cap);
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    const Vec t = Vec::loadu(capped + i) / cap_v;
    (Vec::loadu(grad + i) * ((one - t) * (one + t))).store(grad + i);
  }
  for (; i < C; ++i) {
    const acc_t t = capped[i] / cap;
    grad[i] *= (acc_t(1) - t) * (acc_t(1) + t);
  }
}

// The class-index formulas of a position that is not ignored, written once for one row (T =
// acc_t, the row path) and for a vector of positions (T = Vectorized<acc_t>, IndexColumns).
template <typename acc_t>
struct IndexFormulas {
  acc_t keep, spread, z_loss, weight_sum;  // 1 - eps, eps / C, z, sum_c w_c (or C)
  bool smoothing;                          // eps != 0
  // keep w_y nll(x_y) + spread (sum_c v_c log s - sum_c v_c (x_c - max)), v_c = w_c (or 1)
  template <typename T>
  T loss(T w_y, T x_y, T max, T log_sum, T weight, T shifted) const {
    T l = T(keep) * w_y * ((max - x_y) + log_sum);
    if (smoothing) l = l + T(spread) * (weight * log_sum - shifted);
    return l;
  }
  template <typename T>
  T z_term(T lse) const { return T(z_loss) * lse * lse; }
  // d(z lse^2)/dx_c = 2 z lse softmax_c: a change of the softmax's coefficient.
  template <typename T>
  T z_coef(T lse) const { return T(acc_t(2) * z_loss) * lse; }
  // a / sum: every class's gradient is (a / sum) e_c - s spread w_c, e_c = exp(x_c - max).
  // The smoothing terms only with smoothing: an infinite or NaN class weight then reaches the
  // rows of its own class only, as in torch (spread 0 times it would be NaN in every row).
  template <typename T>
  T coef_over_sum(T s, T w_y, T z_coef, T inv_sum) const {
    T a = T(keep) * w_y;
    if (smoothing) a = a + T(spread * weight_sum);
    return s * (a + z_coef) * inv_sum;
  }
  // b: every class's gradient less b w_c, b = s spread; 0 without smoothing whatever s is (an
  // infinite grad_output times spread 0 made every entry NaN; torch, and our CUDA kernels:
  // inf p_c).
  template <typename T>
  T smoothing_scale(T s) const { return smoothing ? s * T(spread) : T(0); }
  // The target's entry: s (keep w_y (p_y - 1) + spread (W p_y - w_y) + z_coef p_y), the
  // differences formed before the scale (C = 1 without z-loss gives exactly 0). NaN where s or
  // s keep w_y is not finite, as torch's: its log-softmax backward takes s keep w_y p_y from
  // s keep w_y (inf - inf), where this form would give an infinity.
  template <typename T>
  T target_grad(T s, T w_y, T z_coef, T p_y) const {
    T g = T(keep) * w_y * (p_y - T(1));
    if (smoothing) g = g + T(spread) * (T(weight_sum) * p_y - w_y);
    return nan_unless_finite(nan_unless_finite(s * (g + z_coef * p_y), s), s * T(keep) * w_y);
  }
};

// Class-index targets of an (N, C, D) input with D > 1 (segmentation logits (N, C, H, W)). An
// item's positions lie side by side in every class, so a block of
// VecS::size() positions (16 with the AVX-512 sweeps) is walked one vector per class: gathered
// position by position, a row cost a scalar load per logit, and C = 19-21 left most of it to
// the row sweeps' scalar tails (2-3x slower than torch's kernel). Per position, the row path's
// formulas (IndexFormulas): the max, e_c = exp(x_c - max) summed in class order, the loss, and
// the gradient a e_c - b w_c with its target entry; the backward op from the saved max and
// log-sum, so that a recomputed gradient has the forward's bits. Soft-capping: the block's capped
// logits first (softcap_row's formula, into scratch), the sweeps on them, and the gradient times
// (1 - t)(1 + t) before its rounding (softcap_grad_row's), in at::vec only.
template <typename scalar_t>
struct IndexColumns {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using VecS = at::vec::Vectorized<scalar_t>;
  static constexpr int64_t kWidth = VecS::size();         // positions per at::vec block
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int kV = int(kWidth / kLanes);         // accumulation vectors per block

  const scalar_t* x;
  scalar_t* gx;             // or null
  const int64_t* labels;
  const acc_t* w;           // class weights, or null
  const scalar_t* g;        // per-row grad_output, or null
  const acc_t* stats_in;    // backward: the saved statistics; else null
  acc_t* stats_out;         // forward: the statistics to save; else null
  acc_t* row_loss;          // forward
  int64_t C, D, rows, ignore_index;
  IndexFormulas<acc_t> f;
  acc_t scale;
  bool weighted;   // the label-smoothing sums wanted (forward with label smoothing)
  // Float accumulation where torch's kernels run AVX-512 (avx512_rows::enabled()) without
  // soft-capping: blocks of 16 positions through the AVX-512 class sweeps (exp twice as wide:
  // compute-bound here).
  bool avx512;
  acc_t cap;  // soft-capping, or 0

  static constexpr int64_t kMaxWidth = 16;
  static_assert(kWidth <= kMaxWidth);
  int64_t width() const { return avx512 ? kMaxWidth : kWidth; }

  static void load(const scalar_t* p, Vec (&v)[kV]) {
    if constexpr (kV == 1) {
      v[0] = Vec::loadu(p);
    } else {
      std::tie(v[0], v[1]) = at::vec::convert_to_float<scalar_t>(VecS::loadu(p));
    }
  }
  static void store(scalar_t* p, const Vec (&v)[kV]) {
    if constexpr (kV == 1) {
      v[0].store(p);
    } else {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    }
  }
  // kWidth values of the input (scalar_t) or of capped logits (acc_t, kWidth apart per class).
  template <typename In>
  static void load_any(const In* p, Vec (&v)[kV]) {
    if constexpr (std::is_same_v<In, scalar_t>) {
      load(p, v);
    } else {
      for (int k = 0; k < kV; ++k) v[k] = Vec::loadu(p + k * kLanes);
    }
  }
  // capped[c kWidth + j] = cap tanh(x_c / cap) for the kWidth positions at xb (softcap_row's
  // formula, lane for lane).
  static void cap_block(const scalar_t* xb, int64_t C, int64_t D, acc_t cap, acc_t* capped) {
    const Vec cap_v(cap), inv_v(acc_t(1) / cap);
    Vec v[kV];
    for (int64_t c = 0; c < C; ++c) {
      load(xb + c * D, v);
      for (int k = 0; k < kV; ++k) {
        (cap_v * (v[k] * inv_v).tanh()).store(capped + c * kWidth + k * kLanes);
      }
    }
  }
  // softcap_grad_row's factor (1 - t)(1 + t), t = capped / cap.
  static Vec cap_factor(const Vec& capped, acc_t cap) {
    const Vec one(1), t = capped / Vec(cap);
    return (one - t) * (one + t);
  }

  // Positions d0 .. d0 + width() - 1 of item n; e, capped: C x width() values of scratch
  // (capped: soft-capping only).
  void block(int64_t n, int64_t d0, acc_t* e, acc_t* capped) const {
    block_at(x + n * C * D + d0, D, n * D + d0, gx ? gx + n * C * D + d0 : nullptr, e, capped);
  }

  // Rows r0 .. r0 + width() - 1 of contiguous (rows, C) logits (D = 1), short rows: transposed
  // into `tile` (classes width() apart), block()'s sweeps on it, the gradient transposed back
  // from `grad_tile` (C x width() values each). The row path's per-row work (a max, a sum and
  // their scalar tails every C < 32 classes) cost 2-3x the column sweeps there.
  void row_block(int64_t r0, scalar_t* tile, scalar_t* grad_tile, acc_t* e,
                 acc_t* capped) const {
    const int64_t W = width();
    to_tile(x + r0 * C, C, W, tile);
    block_at(tile, W, r0, gx ? grad_tile : nullptr, e, capped);
    // after block_at: gx may be x itself (inplace_backward)
    if (gx) from_tile(grad_tile, C, W, gx + r0 * C);
  }

  // W rows of C values -> tile[c W + j], and back (16 rows of 32- or 16-bit values: AVX-512
  // transposes where available).
  static constexpr bool kAvx512Tiles = !std::is_same_v<scalar_t, double>;
  static void to_tile(const scalar_t* rows, int64_t C, int64_t W, scalar_t* tile) {
#if defined(TL_HAVE_AVX512_ROWS)
    if constexpr (kAvx512Tiles) {
      if (W == 16 && avx512_rows::enabled()) return avx512_rows::rows_to_tile(rows, C, tile);
    }
#endif
    for (int64_t j = 0; j < W; ++j) {
      for (int64_t c = 0; c < C; ++c) tile[c * W + j] = rows[j * C + c];
    }
  }
  static void from_tile(const scalar_t* tile, int64_t C, int64_t W, scalar_t* rows) {
#if defined(TL_HAVE_AVX512_ROWS)
    if constexpr (kAvx512Tiles) {
      if (W == 16 && avx512_rows::enabled()) return avx512_rows::tile_to_rows(tile, C, rows);
    }
#endif
    for (int64_t j = 0; j < W; ++j) {
      for (int64_t c = 0; c < C; ++c) rows[j * C + c] = tile[c * W + j];
    }
  }

  // The sweeps of width() positions: class c of position j at xb[c stride + j], its gradient
  // at gb[c stride + j] (gb null: none), rows r0.. of the labels and statistics.
  void block_at(const scalar_t* xb, int64_t stride, int64_t r0, scalar_t* gb, acc_t* e,
                acc_t* capped) const {
    const int64_t W = width();
    if (cap != 0) cap_block(xb, C, stride, cap, capped);
    const acc_t* xc = cap != 0 ? capped : nullptr;  // the capped logits (W == kWidth), or null
    // Per position: the max, then e_c = exp(x_c - max) into e[c W + j] with their sum and the
    // label-smoothing sums (sums[0, W), [W, 2W), [2W, 3W)).
    acc_t ms[kMaxWidth], sums[3 * kMaxWidth];
    if (stats_in) std::copy(stats_in + r0, stats_in + r0 + W, ms);
#if defined(TL_HAVE_AVX512_ROWS)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (avx512) {
        if (!stats_in) avx512_rows::column_max(xb, C, stride, ms);
        weighted ? avx512_rows::column_exp<true>(xb, w, C, stride, ms, e, sums)
                 : avx512_rows::column_exp<false>(xb, w, C, stride, ms, e, sums);
      }
    }
#endif
    if (!avx512) xc ? exp_sweeps(xc, kWidth, ms, e, sums) : exp_sweeps(xb, stride, ms, e, sums);
    // log of the sum (an all -inf position: exp(nan) terms and a nan sum, as torch's
    // log_softmax) and 1 / sum = exp(-log sum) as the row path forms it, in vectors (a libm log
    // and exp per position were a third of the time at C = 21).
    acc_t log_sums[kMaxWidth], inv_sums[kMaxWidth];
    for (int64_t j = 0; j < W; j += kLanes) {
      const Vec log_sum = stats_in ? Vec::loadu(stats_in + rows + r0 + j)
                                   : Math<Vec>::log(Vec::loadu(sums + j));
      log_sum.store(log_sums + j);
      Math<Vec>::exp(log_sum.neg()).store(inv_sums + j);
    }
    // Per position: its statistics saved, its loss and the gradient's coefficients, in vectors
    // (scalar code per position was as costly as the class sweeps at C = 21); the target's
    // logit, weight and e gathered first (class 0's for an ignored position, unused).
    acc_t x_y[kMaxWidth], w_y[kMaxWidth], e_y[kMaxWidth], s_row[kMaxWidth], counted[kMaxWidth];
    bool ignored[kMaxWidth];
    for (int64_t j = 0; j < W; ++j) {
      const int64_t y = labels[r0 + j];
      ignored[j] = y == ignore_index;
      const int64_t yc = ignored[j] ? 0 : y;
      x_y[j] = xc ? xc[yc * W + j] : static_cast<acc_t>(xb[yc * stride + j]);
      w_y[j] = w ? w[yc] : acc_t(1);
      e_y[j] = e[yc * W + j];
      s_row[j] = g ? scale * static_cast<acc_t>(g[r0 + j]) : scale;
      counted[j] = ignored[j] ? 0 : 1;
    }
    acc_t a[kMaxWidth], b[kMaxWidth], ignored_grad[kMaxWidth], target_grad[kMaxWidth];
    const Vec zero(0);
    for (int64_t j = 0; j < W; j += kLanes) {
      const Vec m = Vec::loadu(ms + j), log_sum = Vec::loadu(log_sums + j);
      const Vec lse = m + log_sum, wy = Vec::loadu(w_y + j);
      const Vec is_counted = Vec::loadu(counted + j) != zero;
      if (stats_out) {
        m.store(stats_out + r0 + j);
        log_sum.store(stats_out + rows + r0 + j);
        Vec l = f.loss(wy, Vec::loadu(x_y + j), m, log_sum, Vec::loadu(sums + W + j),
                       Vec::loadu(sums + 2 * W + j));
        if (f.z_loss != 0) l = l + f.z_term(lse);
        Vec::blendv(zero, l, is_counted).store(row_loss + r0 + j);  // 0 if ignored
      }
      if (!gx) continue;
      // 0 * softmax for an ignored position, as the row path: +0, NaN where lse is not finite.
      Vec::blendv(lse * zero, zero, (lse - lse) == zero).store(ignored_grad + j);
      const Vec s = Vec::loadu(s_row + j), inv_sum = Vec::loadu(inv_sums + j);
      const Vec z_coef = f.z_loss != 0 ? f.z_coef(lse) : zero;
      const Vec p_y = Vec::loadu(e_y + j) * inv_sum;
      Vec::blendv(zero, f.coef_over_sum(s, wy, z_coef, inv_sum), is_counted).store(a + j);
      Vec::blendv(zero, f.smoothing_scale(s), is_counted).store(b + j);
      f.target_grad(s, wy, z_coef, p_y).store(target_grad + j);
    }
    if (!gb) return;
#if defined(TL_HAVE_AVX512_ROWS)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (avx512) {
        __mmask16 mask = 0;
        for (int j = 0; j < 16; ++j) mask |= __mmask16(ignored[j]) << j;
        avx512_rows::column_grad(w, e, gb, C, stride, a, b, ignored_grad, mask, f.smoothing);
      }
    }
#endif
    if (!avx512) grad_sweep(e, xc, a, b, ignored_grad, ignored, gb, stride);
    for (int64_t j = 0; j < W; ++j) {
      if (ignored[j]) continue;
      const int64_t y = labels[r0 + j];
      acc_t g_y = target_grad[j];
      if (xc) {  // softcap_grad_row's factor, as cap_factor
        const acc_t t_y = xc[y * W + j] / cap;
        g_y *= (acc_t(1) - t_y) * (acc_t(1) + t_y);
      }
      gb[y * stride + j] = static_cast<scalar_t>(g_y);
    }
  }

 private:
  // block()'s class sweeps in at::vec for kWidth positions (class c at xb + c stride): the max
  // (unless saved), then e and the sums.
  template <typename In>
  void exp_sweeps(const In* xb, int64_t stride, acc_t* ms, acc_t* e, acc_t* sums) const {
    Vec v[kV], m[kV], sum[kV], vw[kV], vs[kV];
    for (int k = 0; k < kV; ++k) {
      m[k] = stats_in ? Vec::loadu(ms + k * kLanes)
                      : Vec(-std::numeric_limits<acc_t>::infinity());
      sum[k] = vw[k] = vs[k] = Vec(0);
    }
    if (!stats_in) {
      for (int64_t c = 0; c < C; ++c) {
        load_any(xb + c * stride, v);
        for (int k = 0; k < kV; ++k) m[k] = at::vec::maximum(m[k], v[k]);  // NaN wins
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      load_any(xb + c * stride, v);
      const Vec wc(w ? w[c] : acc_t(1));
      for (int k = 0; k < kV; ++k) {
        const Vec d = v[k] - m[k];
        const Vec ev = Math<Vec>::exp(d);
        ev.store(e + c * kWidth + k * kLanes);
        sum[k] = sum[k] + ev;
        if (weighted) {
          vw[k] = vw[k] + wc;
          vs[k] = vs[k] + wc * d;
        }
      }
    }
    for (int k = 0; k < kV; ++k) {
      m[k].store(ms + k * kLanes);
      sum[k].store(sums + k * kLanes);
      vw[k].store(sums + kWidth + k * kLanes);
      vs[k].store(sums + 2 * kWidth + k * kLanes);
    }
  }

  // grad_c = a e_c - b w_c for kWidth positions, ignored_grad where ignored, times the cap's
  // factor where xc (the capped logits) is given, into gb + c stride.
  void grad_sweep(const acc_t* e, const acc_t* xc, const acc_t* a, const acc_t* b,
                  const acc_t* ignored_grad, const bool* ignored, scalar_t* gb,
                  int64_t stride) const {
    Vec v[kV], a_v[kV], b_v[kV], ign_v[kV], ign_mask[kV];
    bool any_ignored = false;
    for (int k = 0; k < kV; ++k) {
      a_v[k] = Vec::loadu(a + k * kLanes);
      b_v[k] = Vec::loadu(b + k * kLanes);
      ign_v[k] = Vec::loadu(ignored_grad + k * kLanes);
      acc_t flags[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        flags[l] = ignored[k * kLanes + l] ? 1 : 0;
        any_ignored |= ignored[k * kLanes + l];
      }
      ign_mask[k] = Vec::loadu(flags) != Vec(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      const Vec wc(w ? w[c] : acc_t(1));
      for (int k = 0; k < kV; ++k) {
        Vec gv = a_v[k] * Vec::loadu(e + c * kWidth + k * kLanes);
        if (f.smoothing) gv = gv - b_v[k] * wc;
        v[k] = any_ignored ? Vec::blendv(gv, ign_v[k], ign_mask[k]) : gv;
        if (xc) v[k] = v[k] * cap_factor(Vec::loadu(xc + c * kWidth + k * kLanes), cap);
      }
      store(gb + c * stride, v);
    }
  }
};

// Probability targets of an (N, C, D) input with D > 1: blocks of kWidth positions as
// IndexColumns, one vector load per class, and the row path's formulas term by term (row_stats'
// sums with v_c = w_c t'_c, row_target_nll's loss, row_grad_probs' gradients), the softmax as
// e_c / s with e_c = exp(x_c - max) kept from the statistics' sweep (the backward op computes it
// again from the saved max: the same bits). Soft-capping as IndexColumns: the sweeps read the
// capped logits, the input gradient takes the cap's factor.
template <typename scalar_t>
struct ProbColumns {
  using IO = IndexColumns<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static constexpr int64_t kWidth = IO::kWidth, kLanes = IO::kLanes;
  static constexpr int kV = IO::kV;

  const scalar_t* x;
  const scalar_t* t;
  scalar_t* gx;           // or null
  scalar_t* gt;           // or null
  const acc_t* w;         // class weights, or null
  const scalar_t* g;      // per-row grad_output, or null
  const acc_t* stats_in;  // backward: the saved statistics; else null
  acc_t* stats_out;       // forward: the statistics to save; else null
  acc_t* row_loss;        // forward
  int64_t C, D, rows;
  IndexFormulas<acc_t> f;  // keep, spread, z_loss
  acc_t scale;
  acc_t cap;  // soft-capping, or 0

  // t'_c = keep t_c + spread, times w_c
  Vec target_weight(const Vec& tv, acc_t wc) const {
    return Vec(wc) * (tv * Vec(f.keep) + Vec(f.spread));
  }

  // Positions d0 .. d0 + kWidth - 1 of item n; e, capped: C x kWidth values of scratch
  // (capped: soft-capping only).
  void block(int64_t n, int64_t d0, acc_t* e, acc_t* capped) const {
    const int64_t off = n * C * D + d0;
    block_at(x + off, t + off, D, n * D + d0, gx ? gx + off : nullptr, gt ? gt + off : nullptr,
             e, capped);
  }

  // Rows per tile: 16 where the AVX-512 transposes run (float: two blocks of 8), else kWidth.
  static int64_t tile_width() {
    return IO::kAvx512Tiles && avx512_rows::enabled() && 16 % kWidth == 0 ? 16 : kWidth;
  }

  // Rows r0 .. r0 + tile_width() - 1 of contiguous (rows, C) logits and targets (D = 1), as
  // IndexColumns::row_block: the logits and targets transposed into tiles, the blocks' sweeps
  // on them, the gradients transposed back (C x tile_width() values each; e, capped: C x
  // kWidth).
  void row_block(int64_t r0, scalar_t* x_tile, scalar_t* t_tile, scalar_t* gx_tile,
                 scalar_t* gt_tile, acc_t* e, acc_t* capped) const {
    const int64_t W = tile_width();
    IO::to_tile(x + r0 * C, C, W, x_tile);
    IO::to_tile(t + r0 * C, C, W, t_tile);
    for (int64_t j0 = 0; j0 < W; j0 += kWidth) {
      block_at(x_tile + j0, t_tile + j0, W, r0 + j0, gx ? gx_tile + j0 : nullptr,
               gt ? gt_tile + j0 : nullptr, e, capped);
    }
    if (gx) IO::from_tile(gx_tile, C, W, gx + r0 * C);
    if (gt) IO::from_tile(gt_tile, C, W, gt + r0 * C);
  }

  // The sweeps of kWidth positions: class c of position j at xb[c stride + j] (targets at tb),
  // its gradients at gxb, gtb (null: not wanted), rows r0.. of the statistics.
  void block_at(const scalar_t* xb, const scalar_t* tb, int64_t stride, int64_t r0,
                scalar_t* gxb, scalar_t* gtb, acc_t* e, acc_t* capped) const {
    if (cap != 0) IO::cap_block(xb, C, stride, cap, capped);
    // class c's logits, capped where soft-capping
    const auto load_x = [&](int64_t c, Vec (&v)[kV]) {
      if (cap != 0) IO::load_any(capped + c * kWidth, v);
      else IO::load(xb + c * stride, v);
    };
    Vec xv[kV], tv[kV], m[kV], log_sum[kV], u[kV], lse[kV];
    for (int k = 0; k < kV; ++k) {
      m[k] = stats_in ? Vec::loadu(stats_in + r0 + k * kLanes)
                      : Vec(-std::numeric_limits<acc_t>::infinity());
    }
    if (stats_in) {
      for (int k = 0; k < kV; ++k) {
        log_sum[k] = Vec::loadu(stats_in + rows + r0 + k * kLanes);
        u[k] = Vec::loadu(stats_in + 2 * rows + r0 + k * kLanes);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        load_x(c, xv);
        for (int k = 0; k < kV; ++k) m[k] = at::vec::maximum(m[k], xv[k]);  // NaN wins
      }
      Vec sum[kV];
      for (int k = 0; k < kV; ++k) sum[k] = u[k] = Vec(0);
      for (int64_t c = 0; c < C; ++c) {
        load_x(c, xv);
        IO::load(tb + c * stride, tv);
        const acc_t wc = w ? w[c] : acc_t(1);
        for (int k = 0; k < kV; ++k) {
          const Vec ev = Math<Vec>::exp(xv[k] - m[k]);
          ev.store(e + c * kWidth + k * kLanes);
          sum[k] = sum[k] + ev;
          u[k] = u[k] + target_weight(tv[k], wc);
        }
      }
      // an all -inf position: exp(nan) terms and a nan sum, as torch's log_softmax
      for (int k = 0; k < kV; ++k) log_sum[k] = Math<Vec>::log(sum[k]);
    }
    for (int k = 0; k < kV; ++k) lse[k] = m[k] + log_sum[k];
    if (stats_out) {
      Vec l[kV];
      for (int k = 0; k < kV; ++k) {
        m[k].store(stats_out + r0 + k * kLanes);
        log_sum[k].store(stats_out + rows + r0 + k * kLanes);
        u[k].store(stats_out + 2 * rows + r0 + k * kLanes);
        l[k] = Vec(0);
      }
      // sum_c w_c t'_c ((max - x_c) + log s), term by term (an infinite target times the
      // max's -log_softmax is inf, not inf * 0 from a split sum)
      for (int64_t c = 0; c < C; ++c) {
        load_x(c, xv);
        IO::load(tb + c * stride, tv);
        const acc_t wc = w ? w[c] : acc_t(1);
        for (int k = 0; k < kV; ++k) {
          l[k] = l[k] + target_weight(tv[k], wc) * ((m[k] - xv[k]) + log_sum[k]);
        }
      }
      for (int k = 0; k < kV; ++k) {
        if (f.z_loss != 0) l[k] = l[k] + f.z_term(lse[k]);
        l[k].store(row_loss + r0 + k * kLanes);
      }
    }
    if (!gxb && !gtb) return;
    Vec sv[kV], uz[kV], inv_sum[kV];
    for (int k = 0; k < kV; ++k) {
      inv_sum[k] = Math<Vec>::exp(log_sum[k].neg());
      acc_t s_row[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        s_row[l] = g ? scale * static_cast<acc_t>(g[r0 + k * kLanes + l]) : scale;
      }
      sv[k] = Vec::loadu(s_row);
      uz[k] = prob_softmax_coef(f.z_loss != 0 ? u[k] + f.z_coef(lse[k]) : u[k], sv[k]);
    }
    Vec out[kV];
    for (int64_t c = 0; c < C; ++c) {
      load_x(c, xv);
      const acc_t wc = w ? w[c] : acc_t(1);
      if (gxb) {
        IO::load(tb + c * stride, tv);
        for (int k = 0; k < kV; ++k) {
          const Vec ev = stats_in ? Math<Vec>::exp(xv[k] - m[k])
                                  : Vec::loadu(e + c * kWidth + k * kLanes);
          out[k] = sv[k] * (uz[k] * (ev * inv_sum[k]) -
                            Vec(wc) * (tv[k] * Vec(f.keep) + Vec(f.spread)));
          if (cap != 0) out[k] = out[k] * IO::cap_factor(xv[k], cap);
        }
        IO::store(gxb + c * stride, out);
      }
      if (gtb) {
        for (int k = 0; k < kV; ++k) {
          out[k] = sv[k] * Vec(f.keep) * Vec(wc) * ((m[k] - xv[k]) + log_sum[k]);
        }
        IO::store(gtb + c * stride, out);
      }
    }
  }
};

// Contiguous rows of fewer classes than this go through the column sweeps in transposed tiles
// (row_block): 64 with the scalar transposes; with the AVX-512 ones (16 rows of 32- or 16-bit
// values), 128 for float and 256 for bfloat16/half (this VM, fwd+bwd against the row path:
// C = 64 1.3x and 1.4x faster, C = 128 even and 1.2x, C = 200 0.93x and 1.25x).
template <typename scalar_t>
int64_t tile_max_classes(int64_t width) {
  if (width == 16 && IndexColumns<scalar_t>::kAvx512Tiles && avx512_rows::enabled()) {
    return sizeof(scalar_t) == 2 ? 256 : 128;
  }
  return 64;
}

template <typename scalar_t>
void cross_entropy_kernel(const CrossEntropyProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = p.N, C = p.C, D = p.D, rows = N * D;
  const bool forward = p.loss.defined();
  const bool probs = p.probability_target;
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t keep = acc_t(1) - eps;
  const acc_t spread = C > 0 ? eps / acc_t(C) : acc_t(0);
  const acc_t z_loss = static_cast<acc_t>(p.z_loss);
  const acc_t cap = static_cast<acc_t>(p.softcap);  // 0: no soft-capping
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const acc_t* w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  const int64_t* labels = probs ? nullptr : p.target.const_data_ptr<int64_t>();
  const scalar_t* t = probs ? p.target.const_data_ptr<scalar_t>() : nullptr;
  // The (K, rows) row statistics: the forward writes them, the backward reads them.
  acc_t* stats_out = forward ? p.row_stats.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t* stats_in = forward ? nullptr : p.row_stats.const_data_ptr<acc_t>();
  scalar_t* gx = p.grad_input.defined() ? p.grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = p.grad_target.defined() ? p.grad_target.mutable_data_ptr<scalar_t>() : nullptr;
  const bool per_row_g = p.grad_output.defined() && p.grad_output.dim() != 0;
  const scalar_t* g = per_row_g ? p.grad_output.const_data_ptr<scalar_t>() : nullptr;
  // Backward into the forward's buffers: they already hold the gradient for grad_output = 1.
  if (p.skip_if_grad_output_is_one &&
      static_cast<acc_t>(p.grad_output.const_data_ptr<scalar_t>()[0]) == acc_t(1)) {
    return;
  }

  acc_t weight_sum = static_cast<acc_t>(C);
  if (w) {
    weight_sum = 0;
    for (int64_t c = 0; c < C; ++c) weight_sum += w[c];
  }
  // Targets are checked, and the 'mean' denominator summed, before any row is touched: the
  // fused gradient needs the denominator.
  double denominator = static_cast<double>(rows);
  if (!probs) {
    denominator = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t y = labels[r];
      if (y == p.ignore_index) continue;
      TORCH_CHECK_INDEX(y >= 0 && y < C, "Target ", y, " is out of bounds.");
      denominator += w ? static_cast<double>(w[y]) : 1.0;
    }
  }
  // A mean over a zero total weight is torch's 0 / 0 = nan (its nll part), label smoothing
  // or not: the loss and every gradient of a row that is not ignored.
  const double mean_factor =
      denominator == 0 ? std::numeric_limits<double>::quiet_NaN() : 1.0 / denominator;
  double scale_d = p.reduction == kMean ? mean_factor : 1.0;  // times grad_output, rounded once
  if (p.grad_output.defined() && !per_row_g) {
    scale_d *= static_cast<double>(p.grad_output.const_data_ptr<scalar_t>()[0]);
  }
  const acc_t scale = static_cast<acc_t>(scale_d);

  // Fresh gradients are faulted in ~256 KB at a time, just before their rows are written.
  const int64_t grad_bytes = N * C * D * static_cast<int64_t>(sizeof(scalar_t));
  const bool prefault = grad_bytes >= kPrefaultMinBytes && !(gx && p.grad_input.is_same(p.input));
  const int64_t prefault_rows = std::max<int64_t>(
      1, (int64_t(256) << 10) / std::max<int64_t>(C * static_cast<int64_t>(sizeof(scalar_t)), 1));

  // The direct rows' sweeps in AVX-512 where torch's kernels run it (float accumulation).
  const bool avx512 = std::is_same_v<acc_t, float> && avx512_rows::enabled();

  std::vector<acc_t> row_loss(forward ? rows : 0);
  // (N, C, D > 1) positions d < column_d in blocks across d (IndexColumns, ProbColumns); the
  // last D % width of each item, and every other kind of row, position by position below.
  const IndexFormulas<acc_t> formulas{keep, spread, z_loss, weight_sum, eps != 0};
  const IndexColumns<scalar_t> columns{x,        gx,         labels,     w,
                                       g,        stats_in,   stats_out,  row_loss.data(),
                                       C,        D,          rows,       p.ignore_index,
                                       formulas, scale,      forward && eps != 0,
                                       std::is_same_v<acc_t, float> &&
                                           avx512_rows::enabled() && cap == 0,
                                       cap};
  const int64_t width = probs ? IndexColumns<scalar_t>::kWidth : columns.width();
  const int64_t column_d = D > 1 && C > 0 ? D / width * width : 0;
  // Blocks of width positions of an item each, with their scratch (e, capped logits).
  const auto run_blocks = [&](const auto& blocks) {
    const int64_t per_item = column_d / width;
    at::parallel_for(0, N * per_item, std::max<int64_t>(1, 32768 / (C * width)),
                     [&](int64_t begin, int64_t end) {
                       std::vector<acc_t> e(C * width), capped(cap != 0 ? C * width : 0);
                       for (int64_t i = begin; i < end; ++i) {
                         blocks.block(i / per_item, i % per_item * width, e.data(),
                                      capped.data());
                       }
                     });
  };
  const ProbColumns<scalar_t> prob_columns{x,        t,         gx,        gt,
                                           w,        g,         stats_in,  stats_out,
                                           row_loss.data(),     C,         D,
                                           rows,     formulas,  scale,     cap};
  // Short contiguous rows (D = 1): tiles of tile_width rows through row_block, the last
  // rows % tile_width by the row path.
  const int64_t tile_width = probs ? ProbColumns<scalar_t>::tile_width() : columns.width();
  const int64_t tile_rows = D == 1 && C > 0 && C < tile_max_classes<scalar_t>(tile_width)
                                ? rows / tile_width * tile_width
                                : 0;
  if (tile_rows > 0) {
    const int64_t tile = C * tile_width;
    at::parallel_for(0, tile_rows / tile_width, std::max<int64_t>(1, 32768 / tile),
                     [&](int64_t begin, int64_t end) {
                       std::vector<scalar_t> x_tile(tile), t_tile(probs ? tile : 0),
                           gx_tile(gx ? tile : 0), gt_tile(gt ? tile : 0);
                       std::vector<acc_t> e(tile), capped(cap != 0 ? tile : 0);
                       for (int64_t i = begin; i < end; ++i) {
                         if (probs) {
                           prob_columns.row_block(i * tile_width, x_tile.data(), t_tile.data(),
                                                  gx_tile.data(), gt_tile.data(), e.data(),
                                                  capped.data());
                         } else {
                           columns.row_block(i * tile_width, x_tile.data(), gx_tile.data(),
                                             e.data(), capped.data());
                         }
                       }
                     });
  }
  if (column_d > 0 && probs) {
    run_blocks(prob_columns);
  } else if (column_d > 0) {
    run_blocks(columns);
  }
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(tile_rows, rows, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> x_buf(C), t_buf(probs ? C : 0), gx_buf(C), gt_buf(gt ? C : 0);
    for (int64_t r = row_begin; r < row_end; ++r) {
      if (r % D < column_d) continue;  // done by the columns
      if (prefault && (r - row_begin) % prefault_rows == 0) {
        // rows r.. of (N, C, D) lie in the (C, D) blocks of n = r / D ..
        const int64_t last = std::min(row_end, r + prefault_rows) - 1;
        const int64_t begin = r / D * C * D, end = (last / D + 1) * C * D;
        prefault_for_write(gx, begin, end);
        prefault_for_write(gt, begin, end);
      }
      const int64_t n = r / D, d = r % D;
      const int64_t offset = n * C * D + d;
      const int64_t y = probs ? 0 : labels[r];
      const bool ignored = !probs && y == p.ignore_index;
      // A class-index gradient is formed from e = exp(x - max) left in the gradient row (or in a
      // float row in cache: half and bfloat16, streamed gradients), by the forward and the
      // backward op alike (a recomputed gradient has the forward's bits).
      const bool exp_in_grad = gx && !probs && !ignored;
      // A forward without gradient takes the same sweeps, e into scratch: the loss has the bits
      // of a forward that writes the gradient, and the sweeps' AVX-512 (row_stats' online pass
      // was 1.2-1.4x slower than torch's forward at C = 64-200).
      const bool exp_sweep = exp_in_grad || (forward && !gx && !gt && !probs && !ignored);
      // Such a row of a contiguous (N, C) without soft-capping is read and written in its own
      // type (no converted copies): half and bfloat16 are converted in registers.
      const bool direct = exp_sweep && D == 1 && cap == 0;
      const acc_t* xr = direct ? nullptr : load_row(x + offset, C, D, x_buf.data());
      if (cap != 0) {  // the capped logits replace the row from here on
        softcap_row(xr, x_buf.data(), C, cap);
        xr = x_buf.data();
      }
      const acc_t* tr = probs ? load_row(t + offset, C, D, t_buf.data()) : nullptr;
      // A large gradient is streamed out of a float row of e in cache (its lines not read).
      const bool stream = direct && grad_bytes >= kStreamMinBytes &&
                          C * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamMinRowBytes;
      acc_t* gxr = !gx       ? (exp_sweep ? gx_buf.data() : nullptr)
                   : stream ? gx_buf.data()
                            : row_out(gx + offset, D, gx_buf.data());
      // x_y before an in-place gradient overwrites it
      const acc_t x_y = probs || ignored ? acc_t(0)
                        : direct         ? static_cast<acc_t>(x[offset + y])
                                         : xr[y];
      const scalar_t* next_row = D == 1 && r + 1 < row_end ? x + offset + C : nullptr;
      // The backward op needs no label-smoothing sums.
      const auto into_exp = [&](const acc_t* saved_max) {
        const bool weighted = eps != 0 && !saved_max;
#if defined(TL_HAVE_AVX512_ROWS)
        if constexpr (std::is_same_v<acc_t, float>) {
          if (direct && avx512) {
            return weighted ? row_stats_into_exp_avx512<true>(x + offset, w, C, gxr, next_row,
                                                              saved_max)
                            : row_stats_into_exp_avx512<false>(x + offset, w, C, gxr, next_row,
                                                               saved_max);
          }
        }
#endif
        if (direct) {
          return weighted ? row_stats_into_exp<true>(x + offset, w, C, gxr, next_row, saved_max)
                          : row_stats_into_exp<false>(x + offset, w, C, gxr, next_row, saved_max);
        }
        const acc_t* no_prefetch = nullptr;
        return weighted ? row_stats_into_exp<true>(xr, w, C, gxr, no_prefetch, saved_max)
                        : row_stats_into_exp<false>(xr, w, C, gxr, no_prefetch, saved_max);
      };
      RowStats<acc_t> st;
      if (forward) {
        st = exp_sweep ? into_exp(nullptr)
                       : row_stats(xr, w, tr, C, keep, spread, probs || eps != 0);
        stats_out[r] = st.max;
        stats_out[rows + r] = st.log_sum;
        if (probs) stats_out[2 * rows + r] = st.weight;
        acc_t l;
        if (probs) {
          l = row_target_nll(xr, w, tr, C, st, keep, spread);
        } else if (ignored) {
          l = 0;
        } else {
          l = formulas.loss(w ? w[y] : acc_t(1), x_y, st.max, st.log_sum, st.weight, st.shifted);
        }
        if (z_loss != 0 && !ignored) l += formulas.z_term(st.lse());
        row_loss[r] = l;
      } else {  // the gradient needs no other row statistic
        st.max = stats_in[r];
        st.log_sum = stats_in[rows + r];
        if (probs) st.weight = stats_in[2 * rows + r];
        if (exp_in_grad) into_exp(&st.max);
      }
      if (!gx && !gt) continue;

      const acc_t s = g ? scale * static_cast<acc_t>(g[r]) : scale;
      const acc_t z_coef = z_loss != 0 && !ignored ? formulas.z_coef(st.lse()) : acc_t(0);
      if (probs) {
        acc_t* gtr = gt ? row_out(gt + offset, D, gt_buf.data()) : nullptr;
        RowStats<acc_t> gst = st;
        gst.weight += z_coef;
        row_grad_probs(xr, w, tr, gxr, gtr, C, gst, s, keep, spread);
        if (gt) store_row(gt + offset, C, D, gtr);
      } else if (ignored) {
        // 0 * softmax, as torch's log_softmax backward: NaN where the row's softmax is NaN.
        std::fill(gxr, gxr + C, std::isfinite(st.lse()) ? acc_t(0) : st.lse() * acc_t(0));
      } else {
        const acc_t wy = w ? w[y] : acc_t(1);
        // 1 / sum from the saved log s, so that the backward op's gradient has the same bits.
        const acc_t inv_sum = std::exp(-st.log_sum);
        const acc_t p_y = gxr[y] * inv_sum;
        const acc_t a_over_sum = formulas.coef_over_sum(s, wy, z_coef, inv_sum);
        const acc_t g_y = formulas.target_grad(s, wy, z_coef, p_y);
        const acc_t b = formulas.smoothing_scale(s);
        if (direct) {
          scalar_t* out = gx + offset;
#if defined(TL_HAVE_AVX512_ROWS)
          if constexpr (std::is_same_v<acc_t, float>) {
            if (avx512) avx512_rows::scale_sweep(w, gxr, out, C, a_over_sum, b, stream);
          }
#endif
          if (!avx512) row_grad_from_exp(w, gxr, out, C, a_over_sum, b, stream);
          out[y] = static_cast<scalar_t>(g_y);
          continue;
        }
        row_grad_from_exp(w, gxr, gxr, C, a_over_sum, b, false);
        gxr[y] = g_y;
      }
      if (gx && cap != 0) softcap_grad_row(xr, gxr, C, cap);
      if (gx) store_row(gx + offset, C, D, gxr);
    }
  });

  if (!forward) return;
  if (p.reduction == kNone) {
    scalar_t* out = p.loss.mutable_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<scalar_t>(row_loss[r]);
  } else {
    double total = 0;  // fixed order: the same bits for any thread count
    for (acc_t l : row_loss) total += l;
    if (p.reduction == kMean) total *= mean_factor;
    p.loss.fill_(total);
  }
}

}  // namespace

void CpuBackend::cross_entropy(const CrossEntropyProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "torch_losses_cross_entropy_cpu",
                                  [&] { cross_entropy_kernel<scalar_t>(p); });
}

}  // namespace torch_losses
