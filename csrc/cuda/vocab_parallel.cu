// Vocabulary-parallel cross-entropy on the GPU: the two per-shard passes of
// csrc/losses/vocab_parallel.h, one block per row (grid-stride over rows). Torch-free; the
// collectives between the passes run in torch_losses/distributed.py.
#include "cuda/common.cuh"
#include "cuda/vocab_parallel_launchers.h"
#include "losses/vocab_parallel.h"

namespace torch_losses {
namespace cuda {
namespace {

namespace vp = vocab_parallel;
constexpr int kThreads = 256;

#define TL_VP_TARGET_CHECK                                                                    \
  "torch_losses vocab_parallel_cross_entropy: a target lies in no rank's shard (out of "       \
  "bounds) or in several (overlapping shards)"
#define TL_VP_SAME_TARGET_CHECK                                                               \
  "torch_losses vocab_parallel_cross_entropy: the targets differ across the ranks of the group"

template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (a != a || a > b) ? a : b;
}

// NaN-propagating max over the block, returned to every thread.
template <typename A>
__device__ __forceinline__ A block_max_all(A v, A* smem /* >= 33 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_down_sync(0xffffffffu, v, o));
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    A m = smem[0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w) m = nan_max(m, smem[w]);
    smem[32] = m;
  }
  __syncthreads();
  return smem[32];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) stats_kernel(VocabParallelStatsArgs<T> a) {
  using A = acc_t<T>;
  __shared__ A smem[33];
  const A cap = A(a.softcap);
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const T* x = a.logits + n * a.V;
    const T* t = a.target_prob != nullptr ? a.target_prob + n * a.V : nullptr;
    A m = -INFINITY;
    for (int64_t c = threadIdx.x; c < a.V; c += blockDim.x) {
      m = nan_max(m, vp::softcapped(to_acc(x[c]), cap));
    }
    m = block_max_all(m, smem);
    // A shard whose logits are all -inf (masked classes) adds nothing to the sums; its shifts
    // (m - x) count from the global max (the host side moves them by M - m).
    const bool empty = m == A(-INFINITY);
    A sum_exp = 0, prob_weight = 0, prob_shift = 0, class_weight = 0, class_shift = 0;
    for (int64_t c = threadIdx.x; c < a.V; c += blockDim.x) {
      const A xc = vp::softcapped(to_acc(x[c]), cap);
      const A shift = empty ? A(0) : m - xc;
      if (!empty) sum_exp += Math<A>::exp(xc - m);
      const A wc = a.weight != nullptr ? a.weight[c] : A(1);
      if (t != nullptr) {
        const A tc = to_acc(t[c]);
        prob_weight += wc * tc;
        prob_shift += wc * tc * shift;
      }
      if (a.smoothing) {
        class_weight += wc;
        class_shift += wc * shift;
      }
    }
    sum_exp = block_sum(sum_exp, smem);
    if (t != nullptr) {
      prob_weight = block_sum(prob_weight, smem);
      prob_shift = block_sum(prob_shift, smem);
    }
    if (a.smoothing) {
      class_weight = block_sum(class_weight, smem);
      class_shift = block_sum(class_shift, smem);
    }
    if (threadIdx.x == 0) {
      A* row = a.stats + n * vp::kLocalColumns;
      row[vp::kLocalMax] = m;
      row[vp::kLocalSumExp] = sum_exp;
      row[vp::kLocalProbWeight] = t != nullptr ? prob_weight : A(0);
      row[vp::kLocalProbShift] = t != nullptr ? prob_shift : A(0);
      row[vp::kLocalClassWeight] = a.smoothing ? class_weight : A(0);
      row[vp::kLocalClassShift] = a.smoothing ? class_shift : A(0);
      row[vp::kLocalTargetGap] = 0;
      row[vp::kLocalTargetWeight] = 0;
      row[vp::kLocalOwned] = 0;
      // Out of bounds is no error here: every rank must reach the collectives.
      if (a.target_index != nullptr) {
        const int64_t y = a.target_index[n];
        const int64_t local = y - a.vocab_start;
        if (y != a.ignore_index && local >= 0 && local < a.V) {
          row[vp::kLocalTargetGap] =
              empty ? A(INFINITY) : m - vp::softcapped(to_acc(x[local]), cap);
          row[vp::kLocalTargetWeight] = a.weight != nullptr ? a.weight[local] : A(1);
          row[vp::kLocalOwned] = 1;
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_kernel(VocabParallelGradArgs<T> a) {
  using A = acc_t<T>;
  const A cap = A(a.softcap);
  const A eps = A(a.label_smoothing > 0 ? a.label_smoothing : 0.0);
  const A spread = eps != A(0) ? eps / *a.vocab_size : A(0);
  const A scale = *a.scale;
  const bool probs = a.probs;
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const A* sums = a.row_sums + n * vp::kSumColumns;
    const int64_t y = probs ? 0 : a.target_index[n];
    const bool ignored = !probs && y == a.ignore_index;
    if (!probs) {
      TL_DEVICE_ASSERT(a.maxima[a.N + n] == double(y) && -a.maxima[2 * a.N + n] == double(y),
                       TL_VP_SAME_TARGET_CHECK);
      TL_DEVICE_ASSERT(ignored || sums[vp::kOwned] == A(1), TL_VP_TARGET_CHECK);
    }
    const vp::GlobalRow<A> g{A(a.maxima[n]), Math<A>::log(sums[vp::kSumExp]), A(1) - eps,
                             spread, A(a.z_loss), sums};
    if (threadIdx.x == 0) a.loss[n] = ignored ? A(0) : g.loss(probs);
    const T* x = a.logits + n * a.V;
    const T* t = a.target_prob != nullptr ? a.target_prob + n * a.V : nullptr;
    if (a.grad_target != nullptr) {
      for (int64_t c = threadIdx.x; c < a.V; c += blockDim.x) {
        const A wc = a.weight != nullptr ? a.weight[c] : A(1);
        a.grad_target[n * a.V + c] =
            from_acc<T>(scale * g.keep * wc * g.nll(vp::softcapped(to_acc(x[c]), cap)));
      }
    }
    if (a.grad_input == nullptr) continue;
    T* gx = a.grad_input + n * a.V;
    if (ignored) {
      // 0 * softmax, as torch's log_softmax backward: NaN where the row's softmax is NaN
      const A lse = g.lse();
      const A zero = (lse - lse == A(0)) ? A(0) : lse * A(0);
      for (int64_t c = threadIdx.x; c < a.V; c += blockDim.x) gx[c] = from_acc<T>(zero);
      continue;
    }
    const A coefficient = g.softmax_coefficient(probs, scale);
    for (int64_t c = threadIdx.x; c < a.V; c += blockDim.x) {
      const A xc = vp::softcapped(to_acc(x[c]), cap);
      const A wc = a.weight != nullptr ? a.weight[c] : A(1);
      const A v = probs ? wc * (g.keep * to_acc(t[c]) + spread) : g.smoothing_share(wc);
      gx[c] = from_acc<T>(scale * (coefficient * g.softmax(xc) - v) * vp::softcap_slope(xc, cap));
    }
    // The target's entry (class index, in this shard), rewritten by the thread that wrote it
    // (grad_input is never the logits' memory).
    const int64_t local = probs ? -1 : y - a.vocab_start;
    if (local >= 0 && local < a.V && local % blockDim.x == threadIdx.x) {
      const A xy = vp::softcapped(to_acc(x[local]), cap);
      gx[local] = from_acc<T>(g.target_grad(g.softmax(xy), sums[vp::kTargetWeight], coefficient,
                                            a.weight != nullptr ? a.weight[local] : A(1), scale,
                                            vp::softcap_slope(xy, cap)));
    }
  }
}

}  // namespace

template <typename T>
void launch_vocab_parallel_stats(const VocabParallelStatsArgs<T>& a, cudaStream_t stream) {
  if (a.N == 0) return;
  launch_kernel<stats_kernel<T>>(grid_for(a.N, int64_t(num_sms()) * 16), kThreads, 0, stream,
                                 a);
}

template <typename T>
void launch_vocab_parallel_grad(const VocabParallelGradArgs<T>& a, cudaStream_t stream) {
  if (a.N == 0) return;
  launch_kernel<grad_kernel<T>>(grid_for(a.N, int64_t(num_sms()) * 16), kThreads, 0, stream,
                                a);
}

#define TL_VP_INSTANTIATE(T)                                                                 \
  template void launch_vocab_parallel_stats<T>(const VocabParallelStatsArgs<T>&,            \
                                               cudaStream_t);                               \
  template void launch_vocab_parallel_grad<T>(const VocabParallelGradArgs<T>&, cudaStream_t);
TL_VP_INSTANTIATE(double)
TL_VP_INSTANTIATE(float)
TL_VP_INSTANTIATE(__half)
TL_VP_INSTANTIATE(__nv_bfloat16)
#undef TL_VP_INSTANTIATE

}  // namespace cuda
}  // namespace torch_losses
