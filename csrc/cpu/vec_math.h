// Math<T> for at::vec::Vectorized, so that the loss formulas of csrc/losses run vectorized on
// the CPU. Comparisons of Vectorized values give lane masks; where() blends on them.
#pragma once

#include <ATen/cpu/vec/vec.h>

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
};

}  // namespace torch_losses
