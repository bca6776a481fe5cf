// Softmax cross-entropy on the CPU. Each position (row) is read once for its log-sum-exp
// (online: a running max and sum of exp, chunk by chunk); when a gradient is wanted the same
// task writes it right away, while the row is still in cache. Only the per-row lse is kept.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_backend.h"
#include "cpu/vec_math.h"

namespace torch_losses {
namespace {

template <typename T>
T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// Sums over one row that the loss needs besides the lse.
template <typename acc_t>
struct RowSums {
  acc_t lse = 0;
  acc_t weighted_x = 0;        // sum_c w_c x_c (class index, smoothing) or sum_c w_c t'_c x_c
  acc_t weighted_target = 0;   // sum_c w_c t'_c (probability targets)
};

// Online log-sum-exp of x[0, C), and the weighted sums in the same pass. w may be null (1);
// t (probability targets) may be null. eps / C blends the targets: t' = (1 - eps) t + eps / C.
template <typename acc_t>
RowSums<acc_t> row_forward(const acc_t* x, const acc_t* w, const acc_t* t, int64_t C,
                           acc_t keep, acc_t spread, bool want_weighted_x) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  constexpr int64_t kBlock = 512;  // in L1 between the max and the exp sweeps
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;
  Vec wx(0), wt(0);
  acc_t wx_tail = 0, wt_tail = 0;
  for (int64_t begin = 0; begin < C; begin += kBlock) {
    const int64_t len = std::min(kBlock, C - begin);
    const acc_t* xb = x + begin;
    Vec mv(-std::numeric_limits<acc_t>::infinity());
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) mv = at::vec::maximum(mv, Vec::loadu(xb + i));
    acc_t lanes[kLanes];
    mv.store(lanes);
    acc_t block_max = lanes[0];
    for (int64_t k = 1; k < kLanes; ++k) block_max = nan_max(block_max, lanes[k]);
    for (; i < len; ++i) block_max = nan_max(block_max, xb[i]);
    const acc_t new_max = nan_max(max, block_max);
    if (new_max != max) {
      sum = max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : sum * std::exp(max - new_max);
      max = new_max;
    }
    const Vec max_v(max);
    Vec sv(0);
    i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      const Vec xv = Vec::loadu(xb + i);
      sv = sv + (xv - max_v).exp();
      if (t) {
        Vec tv = Vec::loadu(t + begin + i) * Vec(keep) + Vec(spread);
        if (w) tv = tv * Vec::loadu(w + begin + i);
        wt = wt + tv;
        wx = wx + tv * xv;
      } else if (want_weighted_x) {
        wx = wx + (w ? Vec::loadu(w + begin + i) * xv : xv);
      }
    }
    sv.store(lanes);
    acc_t block_sum = 0;
    for (int64_t k = 0; k < kLanes; ++k) block_sum += lanes[k];
    for (; i < len; ++i) {
      const acc_t xs = xb[i];
      block_sum += std::exp(xs - max);
      const acc_t ws = w ? w[begin + i] : acc_t(1);
      if (t) {
        const acc_t ts = ws * (t[begin + i] * keep + spread);
        wt_tail += ts;
        wx_tail += ts * xs;
      } else if (want_weighted_x) {
        wx_tail += ws * xs;
      }
    }
    sum += block_sum;
  }
  RowSums<acc_t> r;
  // An all -inf row (max -inf) gives nan, as torch's log_softmax.
  r.lse = max == -std::numeric_limits<acc_t>::infinity()
              ? std::numeric_limits<acc_t>::quiet_NaN()
              : max + std::log(sum);
  acc_t lanes[kLanes];
  wx.store(lanes);
  r.weighted_x = wx_tail;
  for (int64_t k = 0; k < kLanes; ++k) r.weighted_x += lanes[k];
  wt.store(lanes);
  r.weighted_target = wt_tail;
  for (int64_t k = 0; k < kLanes; ++k) r.weighted_target += lanes[k];
  return r;
}

// sum_c w_c t'_c over one row: what the backward op needs besides the saved lse.
template <typename acc_t>
acc_t row_weighted_target(const acc_t* w, const acc_t* t, int64_t C, acc_t keep, acc_t spread) {
  acc_t s = 0;
  for (int64_t c = 0; c < C; ++c) s += (w ? w[c] : acc_t(1)) * (t[c] * keep + spread);
  return s;
}

// grad_c = a * softmax_c - b * w_c (class-index targets; the target entry is fixed after).
template <typename acc_t>
void row_grad_softmax(const acc_t* x, const acc_t* w, acc_t* grad, int64_t C, acc_t lse,
                      acc_t a, acc_t b) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec lse_v(lse), a_v(a), b_v(b);
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    Vec gv = a_v * Math<Vec>::fast_exp(Vec::loadu(x + i) - lse_v);
    if (w && b != 0) gv = gv - b_v * Vec::loadu(w + i);
    else if (b != 0) gv = gv - b_v;
    gv.store(grad + i);
  }
  for (; i < C; ++i) grad[i] = a * std::exp(x[i] - lse) - b * (w ? w[i] : acc_t(1));
}

// Probability targets: grad_x_c = s (softmax_c * sum_wt - w_c t'_c),
// grad_t_c = s (1 - eps) w_c (lse - x_c).
template <typename acc_t>
void row_grad_probs(const acc_t* x, const acc_t* w, const acc_t* t, acc_t* gx, acc_t* gt,
                    int64_t C, acc_t lse, acc_t sum_wt, acc_t s, acc_t keep, acc_t spread) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec lse_v(lse), a_v(s * sum_wt), s_v(s), keep_v(keep), spread_v(spread),
      gt_v(s * keep);
  int64_t i = 0;
  for (; i + Vec::size() <= C; i += Vec::size()) {
    const Vec xv = Vec::loadu(x + i);
    const Vec wv = w ? Vec::loadu(w + i) : Vec(1);
    if (gx) {
      const Vec tv = Vec::loadu(t + i) * keep_v + spread_v;
      (a_v * Math<Vec>::fast_exp(xv - lse_v) - s_v * wv * tv).store(gx + i);
    }
    if (gt) (gt_v * wv * (lse_v - xv)).store(gt + i);
  }
  for (; i < C; ++i) {
    const acc_t ws = w ? w[i] : acc_t(1);
    if (gx) gx[i] = s * sum_wt * std::exp(x[i] - lse) - s * ws * (t[i] * keep + spread);
    if (gt) gt[i] = s * keep * ws * (lse - x[i]);
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

template <typename scalar_t>
void cross_entropy_kernel(const CrossEntropyProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = p.N, C = p.C, D = p.D, rows = N * D;
  const bool forward = p.loss.defined();
  const bool probs = p.probability_target;
  const acc_t eps = static_cast<acc_t>(p.label_smoothing);
  const acc_t keep = acc_t(1) - eps;
  const acc_t spread = C > 0 ? eps / acc_t(C) : acc_t(0);
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const acc_t* w = p.weight.defined() ? p.weight.const_data_ptr<acc_t>() : nullptr;
  const int64_t* labels = probs ? nullptr : p.target.const_data_ptr<int64_t>();
  const scalar_t* t = probs ? p.target.const_data_ptr<scalar_t>() : nullptr;
  acc_t* lse = p.lse.mutable_data_ptr<acc_t>();
  scalar_t* gx = p.grad_input.defined() ? p.grad_input.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = p.grad_target.defined() ? p.grad_target.mutable_data_ptr<scalar_t>() : nullptr;
  const bool per_row_g = p.grad_output.defined() && p.reduction == kNone;
  const scalar_t* g = per_row_g ? p.grad_output.const_data_ptr<scalar_t>() : nullptr;

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
  acc_t scale = p.reduction == kMean ? static_cast<acc_t>(1.0 / denominator) : acc_t(1);
  if (p.grad_output.defined() && !per_row_g) {
    scale *= static_cast<acc_t>(p.grad_output.const_data_ptr<scalar_t>()[0]);
  }

  if (p.grad_input.defined() && !p.grad_input.is_same(p.input)) advise_huge_pages(p.grad_input);
  advise_huge_pages(p.grad_target);

  std::vector<acc_t> row_loss(forward ? rows : 0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t row_begin, int64_t row_end) {
    std::vector<acc_t> x_buf(C), t_buf(probs ? C : 0), gx_buf(C), gt_buf(gt ? C : 0);
    for (int64_t r = row_begin; r < row_end; ++r) {
      const int64_t n = r / D, d = r % D;
      const int64_t offset = n * C * D + d;
      const acc_t* xr = load_row(x + offset, C, D, x_buf.data());
      const acc_t* tr = probs ? load_row(t + offset, C, D, t_buf.data()) : nullptr;
      const int64_t y = probs ? 0 : labels[r];
      const bool ignored = !probs && y == p.ignore_index;

      RowSums<acc_t> sums;
      if (forward) {
        sums = row_forward(xr, w, tr, C, keep, spread, !probs && eps != 0);
        lse[r] = sums.lse;
        acc_t l;
        if (probs) {
          l = sums.lse * sums.weighted_target - sums.weighted_x;
        } else if (ignored) {
          l = 0;
        } else {
          const acc_t wy = w ? w[y] : acc_t(1);
          l = keep * wy * (sums.lse - xr[y]);
          if (eps != 0) l += spread * (weight_sum * sums.lse - sums.weighted_x);
        }
        row_loss[r] = l;
      } else {
        sums.lse = lse[r];
        if (probs) sums.weighted_target = row_weighted_target(w, tr, C, keep, spread);
      }
      if (!gx && !gt) continue;

      const acc_t s = g ? scale * static_cast<acc_t>(g[r]) : scale;
      acc_t* gxr = gx ? row_out(gx + offset, D, gx_buf.data()) : nullptr;
      if (probs) {
        acc_t* gtr = gt ? row_out(gt + offset, D, gt_buf.data()) : nullptr;
        row_grad_probs(xr, w, tr, gxr, gtr, C, sums.lse, sums.weighted_target, s, keep, spread);
        if (gt) store_row(gt + offset, C, D, gtr);
      } else if (ignored) {
        std::fill(gxr, gxr + C, acc_t(0));
      } else {
        const acc_t wy = w ? w[y] : acc_t(1);
        const acc_t target_part = keep * wy * s;
        const acc_t x_y = xr[y];  // read before the row is overwritten (in-place gradient)
        row_grad_softmax(xr, w, gxr, C, sums.lse, target_part + spread * weight_sum * s,
                         spread * s);
        // (p_y - 1)-type term in the accumulation type, before rounding.
        gxr[y] = (target_part + spread * weight_sum * s) * std::exp(x_y - sums.lse) -
                 spread * s * (w ? w[y] : acc_t(1)) - target_part;
      }
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
    if (p.reduction == kMean) total /= denominator;  // nothing counted: 0 / 0 = nan, as torch
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
