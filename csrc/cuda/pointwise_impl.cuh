// The one CUDA kernel of every pointwise loss (the functors of losses/pointwise.h): loss,
// per-chunk reduction partials and both gradients in one pass over memory. Included by the
// pointwise_*.cu files, each of which instantiates a few losses (parallel compilation).
#pragma once

#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/pointwise_fast_math.cuh"
#include "losses/pointwise.h"

namespace torch_losses {
namespace cuda {

// The functor of each kind, in math M.
template <PointwiseKind K, typename A, typename M>
struct LossOf;
#define TL_LOSS_OF(KIND, ...)                      \
  template <typename A, typename M>                \
  struct LossOf<PointwiseKind::KIND, A, M> {       \
    using type = __VA_ARGS__;                      \
  };
TL_LOSS_OF(BCEWithLogits, BCEWithLogitsUsing<A, M>)
TL_LOSS_OF(Huber, Huber<A>)
TL_LOSS_OF(SmoothL1, SmoothL1Using<A, M>)
TL_LOSS_OF(MSE, MSE<A>)
TL_LOSS_OF(L1, L1<A>)
TL_LOSS_OF(BCE, BCEUsing<A, M>)
TL_LOSS_OF(Hinge, Hinge<A>)
TL_LOSS_OF(KLDiv, KLDivUsing<A, M>)
TL_LOSS_OF(KLDivLogTarget, KLDivLogTargetUsing<A, M>)
#undef TL_LOSS_OF

// bf16/fp16 compute in float and round to 8/11 bits: the MUFU math of pointwise_fast_math.cuh
// (<= ~2^-15 relative). float and double keep the accurate functions.
template <typename T>
using PwMath = std::conditional_t<sizeof(T) == 2, FastMath, Math<acc_t<T>>>;

constexpr int kPwThreads = 256;
constexpr int kPwUnroll = 4;  // vectors per thread and chunk, walked in pairs

// The optional input streams of the vector path, each a template flag: an absent stream holds
// no registers. The scalar path (kAllStreams) tests the pointers at run time.
enum PwStream : int { kWeightStream = 1, kAuxStream = 2, kGradStream = 4, kAllStreams = 7 };

// BCE-with-logits' parameter says whether pos_weight (aux) is given. On the vector path that is
// kStreams' kAuxStream, a constant: built from the runtime parameter, the flag was re-tested
// (a DSETP on the double parameter) for each element's loss and gradient.
template <class Loss>
constexpr bool kParamIsPosWeight = false;
template <typename A, typename M>
constexpr bool kParamIsPosWeight<BCEWithLogitsUsing<A, M>> = true;

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

// One loaded vector of elements i0 .. i0 + V - 1: their losses added to sum in element order,
// losses and gradients stored as vectors. Streams absent from kStreams are not read.
template <int kStreams, typename Loss, typename T>
__device__ __forceinline__ void pw_vector(const Loss& f, const PointwiseArgs<T>& a, int64_t i0,
                                          const Vec<T>& xv, const Vec<T>& yv, const Vec<T>& wv,
                                          const Vec<T>& av, const Vec<T>& gv, acc_t<T> gscale,
                                          bool want_loss, bool loss_elem, acc_t<T>& sum) {
  using A = acc_t<T>;
  constexpr int V = VecTraits<T>::kVec;
  Vec<T> lv, giv, gtv;
  bool bad = false;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const A x = to_acc(xv.v[v]), y = to_acc(yv.v[v]);
    const A w = (kStreams & kWeightStream) ? to_acc(wv.v[v]) : A(1);
    const A aux = (kStreams & kAuxStream) ? to_acc(av.v[v]) : A(1);
    const A gfac = (kStreams & kGradStream) ? gscale * to_acc(gv.v[v]) : gscale;
    if (Loss::kChecksDomain) bad |= f.invalid(x, y) != A(0);
    const A sh = f.shared(x, y);
    // Every output element assigned on every path (a select, not a branch): vectors of 16-bit
    // elements filled only on some paths were kept in local memory (200-300 B of spills).
    const A l = want_loss ? w * f.value(x, y, aux, sh) : A(0);
    const A gi = a.grad_input != nullptr ? w * f.grad_input(x, y, aux, sh) * gfac : A(0);
    const A gt = a.grad_target != nullptr ? w * f.grad_target(x, y, aux, sh) * gfac : A(0);
    sum += l;
    lv.v[v] = from_acc<T>(l);
    giv.v[v] = from_acc<T>(gi);
    gtv.v[v] = from_acc<T>(gt);
  }
  if (Loss::kChecksDomain) TL_DEVICE_ASSERT(!bad, Loss::kDomainError);
  if (loss_elem) st_vec(a.loss + i0, lv);
  if (a.grad_input != nullptr) st_vec(a.grad_input + i0, giv);
  if (a.grad_target != nullptr) st_vec(a.grad_target + i0, gtv);
}

// The chunk's sum to partials[k], in block_sum's order with one barrier instead of two: the warp
// sums alternate between two halves of smem by the parity of the block's own iteration `it`
// (its it-th chunk, k = blockIdx.x + it gridDim.x). Warp 0 reads half it & 1 before it reaches
// iteration it + 1's barrier, which every write of iteration it + 2 to that half follows. (The
// parity of k would not alternate: gridDim.x is SMs x blocks per SM, even on every A100/H100/
// H200, so all of a block's chunks used one half, and a warp with no elements left in the last
// chunk could overwrite its sum before warp 0 had read it. The emulator's ascending schedule hid
// it; its high-first schedule shows it: test_results_bitwise_equal_under_high_first_schedule.)
template <typename A>
__device__ __forceinline__ void pw_chunk_partial(A sum, A (*smem)[32], int64_t it, int64_t k,
                                                 A* partials) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  A* half = smem[it & 1];
  sum = warp_sum(sum);
  if (lane == 0) half[warp] = sum;
  __syncthreads();
  if (warp == 0) {
    sum = warp_sum(lane < kPwThreads / 32 ? half[lane] : A(0));
    if (lane == 0) partials[k] = sum;
  }
}

// kVecPath: every pointer is 16-byte aligned, so whole vectors are loaded and stored with one
// instruction, two vectors of each stream in flight per thread. Both paths use the same
// element-to-thread map and summation order: thread t of the block handles, in chunk k, the
// elements k*CH + (u*256 + t)*V + v for u < 4, v < V, in that order. kStreams: the optional
// streams present (vector path), kAllStreams for the scalar path.
// Launch bounds: 3 blocks of 256 threads per SM (<= 80 registers); double, 2 (<= 128: its
// BCE-with-logits with all five streams spilled at 80). No instance spills.
template <typename Loss, typename T, bool kVecPath, int kStreams>
__global__ void __launch_bounds__(kPwThreads, sizeof(T) == 8 ? 2 : 3)
    pointwise_kernel(const PwParams<T> P) {
  using A = acc_t<T>;
  constexpr int V = VecTraits<T>::kVec;
  constexpr int64_t CH = int64_t(kPwThreads) * V * kPwUnroll;
  __shared__ A smem[2][32];

  const PointwiseArgs<T>& a = P.a;
  const Loss f(kVecPath && kParamIsPosWeight<Loss> ? double((kStreams & kAuxStream) != 0)
                                                    : a.param);
  const int64_t n = a.n;
  const bool want_loss = a.loss != nullptr;
  const bool loss_elem = want_loss && a.reduction == 0;
  const bool reduce = want_loss && a.reduction != 0;
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
  // An element's optional values: the scalar path reads what is there.
  auto scalar = [&](int64_t i) {
    const A w = wp != nullptr ? to_acc(wp[i]) : A(1);
    const A aux = ap != nullptr ? to_acc(ap[i]) : A(1);
    const A gfac =
        (gp != nullptr && !a.grad_output_scalar) ? gscale * to_acc(gp[i]) : gscale;
    return pw_element<Loss, T>(f, a, to_acc(xp[i]), to_acc(yp[i]), w, aux, gfac, i, want_loss,
                               loss_elem);
  };
  // One vector of the vector path, or the elements of a ragged last one.
  auto single = [&](int64_t i0, A& sum) {
    if (i0 + V <= n) {
      Vec<T> wv{}, av{}, gv{};
      if (kStreams & kWeightStream) wv = ld_vec(wp + i0);
      if (kStreams & kAuxStream) av = ld_vec(ap + i0);
      if (kStreams & kGradStream) gv = ld_vec(gp + i0);
      pw_vector<kStreams>(f, a, i0, ld_vec(xp + i0), ld_vec(yp + i0), wv, av, gv, gscale,
                          want_loss, loss_elem, sum);
    } else {
      for (int64_t i = i0; i < n && i < i0 + V; ++i) sum += scalar(i);
    }
  };

  for (int64_t k = blockIdx.x, it = 0; k < P.num_chunks; k += gridDim.x, ++it) {
    const int64_t base = k * CH;
    A sum = 0;
    if constexpr (kVecPath) {
      if (base + CH <= n) {
        // A whole chunk: no bounds checks; both vectors of every stream are loaded before
        // either is used.
#pragma unroll 1
        for (int u = 0; u < kPwUnroll; u += 2) {
          const int64_t i0 = base + (int64_t(u) * kPwThreads + threadIdx.x) * V;
          const int64_t i1 = i0 + int64_t(kPwThreads) * V;
          Vec<T> w0{}, w1{}, a0{}, a1{}, g0{}, g1{};
          const Vec<T> x0 = ld_vec(xp + i0), x1 = ld_vec(xp + i1);
          const Vec<T> y0 = ld_vec(yp + i0), y1 = ld_vec(yp + i1);
          if (kStreams & kWeightStream) w0 = ld_vec(wp + i0), w1 = ld_vec(wp + i1);
          if (kStreams & kAuxStream) a0 = ld_vec(ap + i0), a1 = ld_vec(ap + i1);
          if (kStreams & kGradStream) g0 = ld_vec(gp + i0), g1 = ld_vec(gp + i1);
          pw_vector<kStreams>(f, a, i0, x0, y0, w0, a0, g0, gscale, want_loss, loss_elem, sum);
          pw_vector<kStreams>(f, a, i1, x1, y1, w1, a1, g1, gscale, want_loss, loss_elem, sum);
        }
      } else {
        // The last chunk: whole vectors, then the elements of a ragged one.
#pragma unroll 1
        for (int u = 0; u < kPwUnroll; ++u) {
          single(base + (int64_t(u) * kPwThreads + threadIdx.x) * V, sum);
        }
      }
    } else {
#pragma unroll 1
      for (int u = 0; u < kPwUnroll; ++u) {
        const int64_t i0 = base + (int64_t(u) * kPwThreads + threadIdx.x) * V;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (i0 + v < n) sum += scalar(i0 + v);
        }
      }
    }
    if (reduce) pw_chunk_partial(sum, smem, it, k, a.partials);
  }
}

template <typename Loss, typename T, bool kVecPath, int kStreams>
void launch_pointwise_kernel(const PwParams<T>& P, cudaStream_t stream) {
  constexpr auto kKernel = pointwise_kernel<Loss, T, kVecPath, kStreams>;
  // One full wave: SMs x the blocks each SM holds (a partial last wave idles SMs).
  const unsigned grid = grid_for(P.num_chunks, int64_t(num_sms()) *
                                                   resident_blocks_per_sm<kKernel>(kPwThreads));
  launch_kernel<kKernel>(grid, kPwThreads, 0, stream, P);
}

// The vector-path kernel for the optional streams present: kHave, plus those of the bits of
// kMask that `streams` has.
template <typename Loss, typename T, int kMask, int kHave = 0>
void launch_vector_path(int streams, const PwParams<T>& P, cudaStream_t stream) {
  if constexpr (kMask == 0) {
    launch_pointwise_kernel<Loss, T, true, kHave>(P, stream);
  } else {
    constexpr int kBit = kMask & -kMask;
    if (streams & kBit) {
      launch_vector_path<Loss, T, kMask & ~kBit, kHave | kBit>(streams, P, stream);
    } else {
      launch_vector_path<Loss, T, kMask & ~kBit, kHave>(streams, P, stream);
    }
  }
}

template <PointwiseKind K, typename T>
void launch_pointwise(const PointwiseArgs<T>& a, cudaStream_t stream) {
  using A = acc_t<T>;
  using Loss = typename LossOf<K, A, PwMath<T>>::type;
  static_assert(int64_t(kPwThreads) * VecTraits<T>::kVec * kPwUnroll == pointwise_chunk<T>(),
                "chunk size mismatch with launchers.h");
  static_assert(kPwUnroll % 2 == 0, "the vector path walks the vectors in pairs");
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
    const int streams = (a.weight != nullptr ? kWeightStream : 0) |
                        (a.aux != nullptr ? kAuxStream : 0) |
                        (a.grad_output != nullptr && !a.grad_output_scalar ? kGradStream : 0);
    // Only BCE-with-logits reads pos_weight (aux); the other kinds get none.
    constexpr int kOptional = kWeightStream | kGradStream |
                              (K == PointwiseKind::BCEWithLogits ? kAuxStream : 0);
    if (vec) {
      launch_vector_path<Loss, T, kOptional>(streams, P, stream);
    } else {
      launch_pointwise_kernel<Loss, T, false, kAllStreams>(P, stream);
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
