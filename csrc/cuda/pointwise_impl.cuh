// The one CUDA kernel of every pointwise loss (the functors of losses/pointwise.h): loss,
// per-chunk reduction partials and both gradients in one pass over memory. Included by the
// pointwise_*.cu files, each of which instantiates a few losses (parallel compilation).
#pragma once

#include "cuda/common.cuh"
#include "losses/pointwise.h"

namespace torch_losses {
namespace cuda {

template <PointwiseKind K>
struct LossOf;
#define TL_LOSS_OF(KIND, NAME)      \
  template <>                       \
  struct LossOf<PointwiseKind::KIND> { \
    template <typename A>           \
    using type = NAME<A>;           \
  };
TL_LOSS_OF(BCEWithLogits, BCEWithLogits)
TL_LOSS_OF(Huber, Huber)
TL_LOSS_OF(SmoothL1, SmoothL1)
TL_LOSS_OF(MSE, MSE)
TL_LOSS_OF(L1, L1)
TL_LOSS_OF(BCE, BCE)
TL_LOSS_OF(Hinge, Hinge)
TL_LOSS_OF(KLDiv, KLDiv)
TL_LOSS_OF(KLDivLogTarget, KLDivLogTarget)
#undef TL_LOSS_OF

constexpr int kPwThreads = 256;
constexpr int kPwUnroll = 4;

// Per-launch constants of the pointwise kernel.
template <typename T>
struct PwParams {
  PointwiseArgs<T> a;
  acc_t<T> scale;      // 1/n for mean, else 1
  int64_t num_chunks;  // chunks of pointwise_chunk<T>() elements
};

// One element: loss (returned, weighted), gradients written when wanted.
template <typename Loss, typename T>
__device__ __forceinline__ acc_t<T> pw_element(const Loss& f, const PointwiseArgs<T>& a,
                                               acc_t<T> x, acc_t<T> y, acc_t<T> w, acc_t<T> av,
                                               acc_t<T> gfac, int64_t i, bool want_loss,
                                               bool loss_elem) {
  using A = acc_t<T>;
  if (Loss::kChecksDomain) {
    TL_DEVICE_ASSERT(!(f.invalid(x, y) != A(0)), Loss::kDomainError);
  }
  const A sh = f.shared(x, y);
  A l = 0;
  if (want_loss) {
    l = w * f.value(x, y, av, sh);
    if (loss_elem) a.loss[i] = from_acc<T>(l);
  }
  if (a.grad_input != nullptr) {
    a.grad_input[i] = from_acc<T>(w * f.grad_input(x, y, av, sh) * gfac);
  }
  if (a.grad_target != nullptr) {
    a.grad_target[i] = from_acc<T>(w * f.grad_target(x, y, av, sh) * gfac);
  }
  return l;
}

// kVecPath: every pointer is 16-byte aligned, so whole vectors are loaded and stored with one
// instruction. Both paths use the same element-to-thread map and summation order: thread t of
// the block handles, in chunk k, the elements k*CH + (u*256 + t)*V + v for u < 4, v < V.
template <typename Loss, typename T, bool kVecPath>
__global__ void __launch_bounds__(kPwThreads, 3) pointwise_kernel(const PwParams<T> P) {
  using A = acc_t<T>;
  constexpr int V = VecTraits<T>::kVec;
  constexpr int64_t CH = int64_t(kPwThreads) * V * kPwUnroll;
  __shared__ A smem[32];

  const PointwiseArgs<T>& a = P.a;
  const Loss f(a.param);
  const int64_t n = a.n;
  const bool want_loss = a.loss != nullptr;
  const bool loss_elem = want_loss && a.reduction == 0;
  const bool reduce = want_loss && a.reduction != 0;
  const bool g_elem = a.grad_output != nullptr && !a.grad_output_scalar;
  // The scalar grad_output is read on the device (no host sync; CUDA-graph safe).
  const A g_scalar =
      (a.grad_output != nullptr && a.grad_output_scalar) ? to_acc(a.grad_output[0]) : A(1);
  // Backward into the forward's buffers, which hold the gradient for grad_output = 1 (issue 13).
  if (a.skip_if_grad_output_is_one && g_scalar == A(1)) return;
  const A gscale = P.scale * g_scalar;

  const T* __restrict__ xp = a.input;
  const T* __restrict__ yp = a.target;
  const T* __restrict__ wp = a.weight;
  const T* __restrict__ ap = a.aux;
  const T* __restrict__ gp = a.grad_output;

  for (int64_t k = blockIdx.x; k < P.num_chunks; k += gridDim.x) {
    const int64_t base = k * CH;
    A sum = 0;
    if (kVecPath) {
      // One vector of each stream at a time: the register budget (launch bounds: 80) keeps 3 blocks
      // of 256 threads per SM, whose loads in flight cover the memory latency.
#pragma unroll 1
      for (int u = 0; u < kPwUnroll; ++u) {
        const int64_t i0 = base + (int64_t(u) * kPwThreads + threadIdx.x) * V;
        if (i0 + V <= n) {
          const Vec<T> xu = ld_vec(xp + i0);
          const Vec<T> yu = ld_vec(yp + i0);
          Vec<T> wv, av, gv, lv, giv, gtv;
          if (wp != nullptr) wv = ld_vec(wp + i0);
          if (ap != nullptr) av = ld_vec(ap + i0);
          if (g_elem) gv = ld_vec(gp + i0);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const A x = to_acc(xu.v[v]), y = to_acc(yu.v[v]);
            const A w = wp != nullptr ? to_acc(wv.v[v]) : A(1);
            const A aux = ap != nullptr ? to_acc(av.v[v]) : A(1);
            const A gfac = g_elem ? gscale * to_acc(gv.v[v]) : gscale;
            if (Loss::kChecksDomain) {
              TL_DEVICE_ASSERT(!(f.invalid(x, y) != A(0)), Loss::kDomainError);
            }
            const A sh = f.shared(x, y);
            if (want_loss) {
              const A l = w * f.value(x, y, aux, sh);
              lv.v[v] = from_acc<T>(l);
              sum += l;
            }
            if (a.grad_input != nullptr) {
              giv.v[v] = from_acc<T>(w * f.grad_input(x, y, aux, sh) * gfac);
            }
            if (a.grad_target != nullptr) {
              gtv.v[v] = from_acc<T>(w * f.grad_target(x, y, aux, sh) * gfac);
            }
          }
          if (loss_elem) st_vec(a.loss + i0, lv);
          if (a.grad_input != nullptr) st_vec(a.grad_input + i0, giv);
          if (a.grad_target != nullptr) st_vec(a.grad_target + i0, gtv);
        } else {
          for (int v = 0; v < V; ++v) {
            const int64_t i = i0 + v;
            if (i >= n) break;
            const A w = wp != nullptr ? to_acc(wp[i]) : A(1);
            const A aux = ap != nullptr ? to_acc(ap[i]) : A(1);
            const A gfac = g_elem ? gscale * to_acc(gp[i]) : gscale;
            sum += pw_element<Loss, T>(f, a, to_acc(xp[i]), to_acc(yp[i]), w, aux, gfac, i,
                                       want_loss, loss_elem);
          }
        }
      }
    } else {
#pragma unroll 1
      for (int u = 0; u < kPwUnroll; ++u) {
        const int64_t i0 = base + (int64_t(u) * kPwThreads + threadIdx.x) * V;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int64_t i = i0 + v;
          if (i < n) {
            const A w = wp != nullptr ? to_acc(wp[i]) : A(1);
            const A aux = ap != nullptr ? to_acc(ap[i]) : A(1);
            const A gfac = g_elem ? gscale * to_acc(gp[i]) : gscale;
            sum += pw_element<Loss, T>(f, a, to_acc(xp[i]), to_acc(yp[i]), w, aux, gfac, i,
                                       want_loss, loss_elem);
          }
        }
      }
    }
    if (reduce) {
      sum = block_sum(sum, smem);
      if (threadIdx.x == 0) a.partials[k] = sum;
    }
  }
}

template <PointwiseKind K, typename T>
void launch_pointwise(const PointwiseArgs<T>& a, cudaStream_t stream) {
  using A = acc_t<T>;
  using Loss = typename LossOf<K>::template type<A>;
  static_assert(int64_t(kPwThreads) * VecTraits<T>::kVec * kPwUnroll == pointwise_chunk<T>(),
                "chunk size mismatch with launchers.h");
  const int64_t n = a.n;
  const bool reduce = a.loss != nullptr && a.reduction != 0;
  const bool mean = a.reduction == 1;
  PwParams<T> P;
  P.a = a;
  // The gradient scale: mean's 1/n. (In a backward with reduction 'none' it stays 1.)
  P.scale = (mean && n > 0) ? A(1.0 / double(n)) : A(1);
  P.num_chunks = pointwise_num_partials<T>(n);
  if (n > 0) {
    const bool vec = aligned16(a.input) && aligned16(a.target) && aligned16(a.weight) &&
                     aligned16(a.aux) && (a.grad_output_scalar || aligned16(a.grad_output)) &&
                     (a.reduction != 0 || aligned16(a.loss)) && aligned16(a.grad_input) &&
                     aligned16(a.grad_target);
    // One full wave: SMs x the blocks each SM holds (a partial last wave idles SMs).
    const int64_t sms = num_sms();
    if (vec) {
      constexpr auto kKernel = pointwise_kernel<Loss, T, true>;
      const unsigned grid =
          grid_for(P.num_chunks, sms * resident_blocks_per_sm<kKernel>(kPwThreads));
      launch_kernel<kKernel>(grid, kPwThreads, 0, stream, P);
    } else {
      constexpr auto kKernel = pointwise_kernel<Loss, T, false>;
      const unsigned grid =
          grid_for(P.num_chunks, sms * resident_blocks_per_sm<kKernel>(kPwThreads));
      launch_kernel<kKernel>(grid, kPwThreads, 0, stream, P);
    }
  }
  if (reduce) {
    // Fixed-order second stage over the per-chunk partials; mean of 0 elements is 0/0 = nan.
    launch_kernel<final_sum_kernel<A, T, ArrayLoad<A>>>(1, kFinalThreads, 0, stream,
                                                        ArrayLoad<A>{a.partials}, P.num_chunks,
                                                        nullptr, mean ? A(n) : A(1), a.loss,
                                                        nullptr);
  }
}

#define TL_INSTANTIATE_POINTWISE(KIND)                                                        \
  template void launch_pointwise<PointwiseKind::KIND, double>(const PointwiseArgs<double>&,   \
                                                              cudaStream_t);                  \
  template void launch_pointwise<PointwiseKind::KIND, float>(const PointwiseArgs<float>&,     \
                                                             cudaStream_t);                   \
  template void launch_pointwise<PointwiseKind::KIND, __half>(const PointwiseArgs<__half>&,   \
                                                              cudaStream_t);                  \
  template void launch_pointwise<PointwiseKind::KIND, __nv_bfloat16>(                         \
      const PointwiseArgs<__nv_bfloat16>&, cudaStream_t);

}  // namespace cuda
}  // namespace torch_losses
