// One CPU kernel for every pointwise loss: loss, its deterministic reduction and the gradients in
// one pass, vectorized with at::vec and parallel over fixed-size chunks.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>
#include <vector>

#include "cpu/cpu_backend.h"
#include "cpu/vec_math.h"

namespace torch_losses {
namespace {

// A chunk of a tensor in the accumulation type: the tensor's own memory when the types agree,
// else a converted copy in `buffer`.
template <typename acc_t, typename scalar_t>
const acc_t* load_chunk(const scalar_t* src, acc_t* buffer, int64_t len) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return src;
  } else {
    convert_to_acc(src, buffer, len);
    return buffer;
  }
}

template <typename acc_t, typename scalar_t>
acc_t* store_target(scalar_t* dst, acc_t* buffer) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return dst;
  } else {
    return buffer;
  }
}

template <typename acc_t, typename scalar_t>
void finish_store(scalar_t* dst, const acc_t* buffer, int64_t len) {
  if constexpr (!std::is_same_v<acc_t, scalar_t>) at::vec::convert(buffer, dst, len);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mut_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <template <typename> class Loss, typename scalar_t>
void pointwise_kernel(const PointwiseProblem& p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();

  const int64_t n = p.input.numel();
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* y = p.target.const_data_ptr<scalar_t>();
  const scalar_t* w = ptr_or_null<scalar_t>(p.weight);
  const scalar_t* a = ptr_or_null<scalar_t>(p.aux);
  const bool forward = p.loss.defined();
  scalar_t* loss_none = forward && p.reduction == kNone ? p.loss.mutable_data_ptr<scalar_t>()
                                                        : nullptr;
  const bool reduce = forward && p.reduction != kNone;
  scalar_t* gx = mut_ptr_or_null<scalar_t>(p.grad_input);
  scalar_t* gy = mut_ptr_or_null<scalar_t>(p.grad_target);
  const bool per_element_g = p.grad_output.defined() && p.grad_output.dim() != 0;
  const scalar_t* g = per_element_g ? p.grad_output.const_data_ptr<scalar_t>() : nullptr;

  // grad_output / n, formed in double and rounded once
  double scale_d = p.reduction == kMean && n > 0 ? 1.0 / static_cast<double>(n) : 1.0;
  if (p.grad_output.defined() && !per_element_g) {
    const double g_scalar = static_cast<double>(p.grad_output.const_data_ptr<scalar_t>()[0]);
    // Backward into the forward's buffers: they already hold the gradient for grad_output = 1.
    if (p.skip_if_grad_output_is_one && g_scalar == 1.0) return;
    scale_d *= g_scalar;
  }
  const acc_t scale = static_cast<acc_t>(scale_d);

  const bool populate_outputs = n * static_cast<int64_t>(sizeof(scalar_t)) >= kPrefaultMinBytes;
  const Loss<acc_t> fs(p.param);
  const Loss<Vec> fv(p.param);
  const int64_t chunks = (n + kCpuChunk - 1) / kCpuChunk;
  std::vector<acc_t> partials(reduce ? chunks : 0);
  std::vector<char> invalid(Loss<acc_t>::kChecksDomain ? chunks : 0, 0);

  at::parallel_for(0, chunks, 8, [&](int64_t chunk_begin, int64_t chunk_end) {
    acc_t xb[kCpuChunk], yb[kCpuChunk], wb[kCpuChunk], ab[kCpuChunk], gb[kCpuChunk];
    acc_t lb[kCpuChunk], gxb[kCpuChunk], gyb[kCpuChunk];
    constexpr int64_t kPopulateChunks = 32;  // 256 KB of float32 output at a time: in L2
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t begin = chunk * kCpuChunk;
      const int64_t len = std::min(kCpuChunk, n - begin);
      if (populate_outputs && (chunk - chunk_begin) % kPopulateChunks == 0) {
        const int64_t end = std::min(n, std::min(chunk_end, chunk + kPopulateChunks) * kCpuChunk);
        prefault_for_write(gx, begin, end);
        prefault_for_write(gy, begin, end);
        prefault_for_write(loss_none, begin, end);
      }
      const acc_t* xc = load_chunk(x + begin, xb, len);
      const acc_t* yc = load_chunk(y + begin, yb, len);
      const acc_t* wc = w ? load_chunk(w + begin, wb, len) : nullptr;
      const acc_t* ac = a ? load_chunk(a + begin, ab, len) : nullptr;
      const acc_t* gc = g ? load_chunk(g + begin, gb, len) : nullptr;
      acc_t* lc = loss_none ? store_target(loss_none + begin, lb) : nullptr;
      acc_t* gxc = gx ? store_target(gx + begin, gxb) : nullptr;
      acc_t* gyc = gy ? store_target(gy + begin, gyb) : nullptr;

      Vec sum(0), bad(0);
      const Vec scale_v(scale), one(1);
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        const Vec xv = Vec::loadu(xc + i), yv = Vec::loadu(yc + i);
        const Vec av = ac ? Vec::loadu(ac + i) : one;
        const Vec wv = wc ? Vec::loadu(wc + i) : one;
        const Vec sv = fv.shared(xv, yv);
        if (lc || reduce) {
          const Vec l = wv * fv.value(xv, yv, av, sv);
          if (lc) l.store(lc + i);
          sum = sum + l;
        }
        const Vec s = gc ? wv * scale_v * Vec::loadu(gc + i) : wv * scale_v;
        if (gxc) (s * fv.grad_input(xv, yv, av, sv)).store(gxc + i);
        if (gyc) (s * fv.grad_target(xv, yv, av, sv)).store(gyc + i);
        if constexpr (Loss<acc_t>::kChecksDomain) bad = bad | fv.invalid(xv, yv);
      }
      acc_t lanes[kLanes];
      sum.store(lanes);
      acc_t chunk_sum = 0;
      for (int64_t k = 0; k < kLanes; ++k) chunk_sum += lanes[k];
      bool chunk_bad = false;
      if constexpr (Loss<acc_t>::kChecksDomain) {
        bad.store(lanes);
        for (int64_t k = 0; k < kLanes; ++k) chunk_bad |= lanes[k] != acc_t(0);
      }
      for (; i < len; ++i) {  // the ragged tail, with the scalar formulas
        const acc_t xs = xc[i], ys = yc[i];
        const acc_t as = ac ? ac[i] : acc_t(1);
        const acc_t ws = wc ? wc[i] : acc_t(1);
        const acc_t ss = fs.shared(xs, ys);
        if (lc || reduce) {
          const acc_t l = ws * fs.value(xs, ys, as, ss);
          if (lc) lc[i] = l;
          chunk_sum += l;
        }
        const acc_t s = gc ? ws * scale * gc[i] : ws * scale;
        if (gxc) gxc[i] = s * fs.grad_input(xs, ys, as, ss);
        if (gyc) gyc[i] = s * fs.grad_target(xs, ys, as, ss);
        if constexpr (Loss<acc_t>::kChecksDomain) chunk_bad |= fs.invalid(xs, ys) != acc_t(0);
      }
      if (lc) finish_store(loss_none + begin, lc, len);
      if (gxc) finish_store(gx + begin, gxc, len);
      if (gyc) finish_store(gy + begin, gyc, len);
      if (reduce) partials[chunk] = chunk_sum;
      if constexpr (Loss<acc_t>::kChecksDomain) invalid[chunk] = chunk_bad;
    }
  });

  if constexpr (Loss<acc_t>::kChecksDomain) {
    for (char bad : invalid) TORCH_CHECK(!bad, Loss<acc_t>::kDomainError);
  }
  if (reduce) {
    double total = 0;  // partials in a fixed order: the same bits for any thread count
    for (acc_t partial : partials) total += partial;
    if (p.reduction == kMean) total /= static_cast<double>(n);  // n = 0 gives nan, as torch
    p.loss.fill_(total);
  }
}

}  // namespace

template <template <typename> class Loss>
void CpuBackend::pointwise(const PointwiseProblem& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "torch_losses_pointwise_cpu",
                                  [&] { pointwise_kernel<Loss, scalar_t>(p); });
}

template void CpuBackend::pointwise<BCEWithLogits>(const PointwiseProblem&);
template void CpuBackend::pointwise<Huber>(const PointwiseProblem&);
template void CpuBackend::pointwise<SmoothL1>(const PointwiseProblem&);
template void CpuBackend::pointwise<MSE>(const PointwiseProblem&);
template void CpuBackend::pointwise<L1>(const PointwiseProblem&);
template void CpuBackend::pointwise<BCE>(const PointwiseProblem&);
template void CpuBackend::pointwise<Hinge>(const PointwiseProblem&);
template void CpuBackend::pointwise<KLDiv>(const PointwiseProblem&);
template void CpuBackend::pointwise<KLDivLogTarget>(const PointwiseProblem&);

}  // namespace torch_losses
