// Vocabulary-parallel cross-entropy on the CPU: the two per-shard passes of
// csrc/losses/vocab_parallel.h (the formulas) and their registrations; argument checks in
// csrc/vocab_parallel_ops.h.
// torch_losses/distributed.py runs the collectives between them.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_backend.h"
#include "cpu/vec_math.h"
#include "losses/vocab_parallel.h"
#include "vocab_parallel_ops.h"

namespace torch_losses {
namespace {

namespace vp = vocab_parallel;

// Row n of the shard in the accumulation type, softcapped.
template <typename acc_t, typename scalar_t>
void load_row(const scalar_t* src, int64_t V, acc_t cap, acc_t* dst) {
  convert_to_acc(src, dst, V);
  if (cap > acc_t(0)) {
    for (int64_t c = 0; c < V; ++c) dst[c] = vp::softcapped(dst[c], cap);
  }
}


// sum_c exp(x_c - m), m finite or NaN
template <typename acc_t>
acc_t row_sum_exp(const acc_t* x, int64_t V, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  const Vec mv(m);
  Vec sv(0);
  int64_t c = 0;
  for (; c + kLanes <= V; c += kLanes) sv = sv + (Vec::loadu(x + c) - mv).exp();
  acc_t lanes[kLanes];
  sv.store(lanes);
  acc_t sum = 0;
  for (int64_t k = 0; k < kLanes; ++k) sum += lanes[k];
  for (; c < V; ++c) sum += std::exp(x[c] - m);
  return sum;
}

template <typename scalar_t>
void stats_kernel(const VocabParallelShard& s, int64_t vocab_start, int64_t ignore_index,
                  bool smoothing, double softcap, Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t V = s.V;
  const scalar_t* x = s.logits.const_data_ptr<scalar_t>();
  const scalar_t* t = s.probs ? s.target.const_data_ptr<scalar_t>() : nullptr;
  const int64_t* labels = s.probs ? nullptr : s.target.const_data_ptr<int64_t>();
  const acc_t* w = s.weight.defined() ? s.weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t cap = static_cast<acc_t>(softcap);
  acc_t* stats = out.mutable_data_ptr<acc_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xr(V), tr(t ? V : 0);
    for (int64_t n = begin; n < end; ++n) {
      load_row(x + n * V, V, cap, xr.data());
      if (t) convert_to_acc(t + n * V, tr.data(), V);
      const acc_t m = nan_max_of(xr.data(), V);
      // A shard whose logits are all -inf (masked classes) adds nothing to the sums; its
      // shifts (m - x) count from the global max (Python moves them by M - m).
      const bool empty = m == -std::numeric_limits<acc_t>::infinity();
      const acc_t sum_exp = empty ? acc_t(0) : row_sum_exp(xr.data(), V, m);
      acc_t prob_weight = 0, prob_shift = 0, class_weight = 0, class_shift = 0;
      if (t || smoothing) {
        for (int64_t c = 0; c < V; ++c) {
          const acc_t shift = empty ? acc_t(0) : m - xr[c];
          const acc_t wc = w ? w[c] : acc_t(1);
          if (t) {
            prob_weight += wc * tr[c];
            prob_shift += wc * tr[c] * shift;
          }
          if (smoothing) {
            class_weight += wc;
            class_shift += wc * shift;
          }
        }
      }
      acc_t* row = stats + n * vp::kLocalColumns;
      row[vp::kLocalMax] = m;
      row[vp::kLocalSumExp] = sum_exp;
      row[vp::kLocalProbWeight] = prob_weight;
      row[vp::kLocalProbShift] = prob_shift;
      row[vp::kLocalClassWeight] = class_weight;
      row[vp::kLocalClassShift] = class_shift;
      row[vp::kLocalTargetGap] = 0;
      row[vp::kLocalTargetWeight] = 0;
      row[vp::kLocalOwned] = 0;
      // An out-of-bounds target is not an error here: every rank must reach the collectives.
      // The grad op raises on every rank from the summed ownership count.
      const int64_t local = labels ? labels[n] - vocab_start : -1;
      if (labels && labels[n] != ignore_index && local >= 0 && local < V) {
        row[vp::kLocalTargetGap] =
            empty ? std::numeric_limits<acc_t>::infinity() : m - xr[local];
        row[vp::kLocalTargetWeight] = w ? w[local] : acc_t(1);
        row[vp::kLocalOwned] = 1;
      }
    }
  });
}

Tensor vocab_parallel_ce_stats(const Tensor& logits, const Tensor& target,
                               const OptTensor& weight, int64_t vocab_start,
                               int64_t ignore_index, double label_smoothing, double softcap) {
  VocabParallelShard s = check_vocab_parallel_shard(logits, target, weight, softcap);
  Tensor out = at::empty({s.N, vp::kLocalColumns},
                         s.logits.options().dtype(accumulation_type(s.logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.logits.scalar_type(),
                                  "torch_losses_vocab_parallel_ce_stats", [&] {
    stats_kernel<scalar_t>(s, vocab_start, ignore_index, label_smoothing > 0, softcap, out);
  });
  return out;
}

// The gradient of a counted row, times scale: (coefficient p_c - v_c) times the softcap slope,
// v_c = w_c (keep t_c + spread) (probabilities t) or spread w_c (class index; the target's entry
// is fixed by the caller). The fast exp flushes results below float's normal range; where a
// non-finite factor multiplies the softmax the exact one keeps inf * tiny = inf, as torch.
template <typename acc_t>
void row_grad(const acc_t* x, const acc_t* w, const acc_t* t, acc_t* out, int64_t V,
              const vp::GlobalRow<acc_t>& g, acc_t coefficient, acc_t scale, acc_t cap) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  const bool exact = !std::isfinite(coefficient) || !std::isfinite(scale);
  const bool smoothing = g.spread != acc_t(0);  // (smoothing_share, per vector)
  const Vec max_v(g.max), log_sum_v(g.log_sum), coefficient_v(coefficient), spread_v(g.spread),
      keep_v(g.keep), scale_v(scale), cap_v(cap), one(1);
  int64_t c = 0;
  for (; c + kLanes <= V; c += kLanes) {
    const Vec xv = Vec::loadu(x + c);
    const Vec arg = (xv - max_v) - log_sum_v;
    const Vec p = exact ? arg.exp() : Math<Vec>::fast_exp(arg);
    const Vec wv = w ? Vec::loadu(w + c) : one;
    const Vec v = t ? wv * (keep_v * Vec::loadu(t + c) + spread_v)
                    : (smoothing ? spread_v * wv : Vec(0));
    Vec gv = scale_v * (coefficient_v * p - v);
    if (cap > acc_t(0)) {
      const Vec r = xv / cap_v;
      gv = gv * (one - r * r);
    }
    gv.store(out + c);
  }
  for (; c < V; ++c) {
    const acc_t wc = w ? w[c] : acc_t(1);
    const acc_t v = t ? wc * (g.keep * t[c] + g.spread) : g.smoothing_share(wc);
    const acc_t d = coefficient * g.softmax(x[c]) - v;
    out[c] = scale * d * vp::softcap_slope(x[c], cap);
  }
}

struct GradArgs {
  Tensor maxima, row_sums, vocab_size, scale;
  int64_t vocab_start = 0, ignore_index = -100;
  double label_smoothing = 0, z_loss = 0, softcap = 0;
};

template <typename scalar_t>
void grad_kernel(const VocabParallelShard& s, const GradArgs& a, Tensor& loss, Tensor& grad_input,
                 Tensor& grad_target) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t V = s.V;
  const scalar_t* x = s.logits.const_data_ptr<scalar_t>();
  const scalar_t* t = s.probs ? s.target.const_data_ptr<scalar_t>() : nullptr;
  const int64_t* labels = s.probs ? nullptr : s.target.const_data_ptr<int64_t>();
  const acc_t* w = s.weight.defined() ? s.weight.const_data_ptr<acc_t>() : nullptr;
  // maxima (3, N) float64: the logits' max, the target's max and minus its min over the ranks
  const double* row_max = a.maxima.const_data_ptr<double>();
  const double* target_max = row_max + s.N;
  const double* target_neg_min = row_max + 2 * s.N;
  const acc_t* sums = a.row_sums.const_data_ptr<acc_t>();
  const acc_t cap = static_cast<acc_t>(a.softcap);
  const acc_t eps = static_cast<acc_t>(a.label_smoothing > 0 ? a.label_smoothing : 0.0);
  const acc_t total_classes = a.vocab_size.const_data_ptr<acc_t>()[0];
  const acc_t spread = eps != acc_t(0) ? eps / total_classes : acc_t(0);
  const acc_t scale = a.scale.const_data_ptr<acc_t>()[0];
  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  scalar_t* gx = grad_input.defined() ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_target.defined() ? grad_target.mutable_data_ptr<scalar_t>() : nullptr;

  // Every rank holds the same maxima and sums, so every rank raises here, together (after the
  // collectives: no rank is left waiting in one).
  if (labels) {
    for (int64_t n = 0; n < s.N; ++n) {
      const double y = static_cast<double>(labels[n]);
      TORCH_CHECK(target_max[n] == y && -target_neg_min[n] == y,
                  "torch_losses: the targets differ across the ranks of the group at row ", n,
                  " (from ", -target_neg_min[n], " to ", target_max[n], "; this rank's: ",
                  labels[n], "): a target out of bounds on some rank, or targets not the same "
                  "on every rank");
      if (labels[n] == a.ignore_index) continue;
      const acc_t owned = sums[n * vp::kSumColumns + vp::kOwned];
      TORCH_CHECK_INDEX(owned != acc_t(0), "Target ", labels[n], " is out of bounds.");
      TORCH_CHECK_INDEX(owned == acc_t(1), "torch_losses: target ", labels[n], " of row ", n,
                        " lies in ", owned, " ranks' vocabulary shards: the shards overlap or "
                        "the ranks' targets differ");
    }
  }

  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1));
  at::parallel_for(0, s.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xr((gx || gt) ? V : 0), tr(t && (gx || gt) ? V : 0);
    std::vector<acc_t> gbuf(gx && !std::is_same_v<acc_t, scalar_t> ? V : 0);
    for (int64_t n = begin; n < end; ++n) {
      const acc_t* row_sums = sums + n * vp::kSumColumns;
      vp::GlobalRow<acc_t> g{static_cast<acc_t>(row_max[n]), std::log(row_sums[vp::kSumExp]),
                             acc_t(1) - eps, spread, static_cast<acc_t>(a.z_loss), row_sums};
      const bool ignored = labels && labels[n] == a.ignore_index;
      loss_out[n] = ignored ? acc_t(0) : g.loss(s.probs);
      if (!gx && !gt) continue;

      load_row(x + n * V, V, cap, xr.data());
      if (t) convert_to_acc(t + n * V, tr.data(), V);
      if (gt) {  // d loss / d t_c = keep w_c (lse - x_c)
        const acc_t k = scale * g.keep;
        for (int64_t c = 0; c < V; ++c) {
          gt[n * V + c] = static_cast<scalar_t>(k * (w ? w[c] : acc_t(1)) * g.nll(xr[c]));
        }
      }
      if (!gx) continue;
      scalar_t* grow = gx + n * V;
      if (ignored) {
        // 0 * softmax, as torch's log_softmax backward: NaN where the row's softmax is NaN.
        const acc_t zero = std::isfinite(g.lse()) ? acc_t(0) : g.lse() * acc_t(0);
        std::fill(grow, grow + V, static_cast<scalar_t>(zero));
        continue;
      }
      const acc_t coefficient = g.softmax_coefficient(s.probs, scale);
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        row_grad(xr.data(), w, s.probs ? tr.data() : nullptr, grow, V, g, coefficient, scale,
                 cap);
      } else {
        row_grad(xr.data(), w, s.probs ? tr.data() : nullptr, gbuf.data(), V, g, coefficient,
                 scale, cap);
        at::vec::convert(gbuf.data(), grow, V);
      }
      const int64_t local = labels ? labels[n] - a.vocab_start : -1;
      if (local >= 0 && local < V) {
        grow[local] = static_cast<scalar_t>(
            g.target_grad(g.softmax(xr[local]), row_sums[vp::kTargetWeight], coefficient,
                          w ? w[local] : acc_t(1), scale, vp::softcap_slope(xr[local], cap)));
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> vocab_parallel_ce_grad(
    const Tensor& logits, const Tensor& target, const OptTensor& weight, const Tensor& maxima,
    const Tensor& row_sums, const Tensor& vocab_size, const Tensor& scale, int64_t vocab_start,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    bool input_grad, bool target_grad) {
  VocabParallelShard s = check_vocab_parallel_shard(logits, target, weight, softcap);
  TORCH_CHECK(!target_grad || s.probs, "torch_losses: class-index targets have no gradient");
  const auto acc = accumulation_type(s.logits.scalar_type());
  check_global_statistics(s, maxima, row_sums, vocab_size, scale);
  GradArgs a{maxima.contiguous(), row_sums.contiguous(), vocab_size, scale, vocab_start,
             ignore_index, label_smoothing, z_loss, softcap};
  Tensor loss = at::empty({s.N}, s.logits.options().dtype(acc));
  Tensor grad_input = grad_like(s.logits, input_grad);
  Tensor grad_target = target_grad ? grad_like(s.target, true) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.logits.scalar_type(),
                                  "torch_losses_vocab_parallel_ce_grad", [&] {
    grad_kernel<scalar_t>(s, a, loss, grad_input, grad_target);
  });
  return {loss, or_empty(grad_input, s.logits), or_empty(grad_target, s.logits)};
}

}  // namespace

void register_vocab_parallel_cpu(torch::Library& m) {
  m.impl("vocab_parallel_ce_stats", &vocab_parallel_ce_stats);
  m.impl("vocab_parallel_ce_grad", &vocab_parallel_ce_grad);
}

}  // namespace torch_losses
