// Math<T> for at::vec::Vectorized, so that the loss formulas of csrc/losses run vectorized on
// the CPU. Comparisons of Vectorized values give lane masks; where() blends on them.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "losses/math.h"

namespace torch_losses {

template <typename S>
struct Math<at::vec::Vectorized<S>> {
  using V = at::vec::Vectorized<S>;
  static V exp(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V abs(const V& x) { return x.abs(); }
  static V where(const V& mask, const V& a, const V& b) { return V::blendv(b, a, mask); }
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
