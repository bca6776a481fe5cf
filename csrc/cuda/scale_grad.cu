// grad *= grad_output in place (torch-free: CUDA headers only). The gradient written by a forward
// is scaled by the incoming gradient: a scalar (the kernel returns at once when it is 1, read on
// the device: no host sync, CUDA-graph safe), per element, or per cross-entropy position.
#include "cuda/common.cuh"

namespace torch_losses {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

// mode 0 (scalar) / 1 (per element), grid-stride over chunks of kThreads * V * kUnroll.
template <typename T, bool kElem, bool kVec>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(T* __restrict__ grad, const T* __restrict__ g, int64_t n) {
  using A = acc_t<T>;
  constexpr int V = VecTraits<T>::kVec;
  A gs = 1;
  if (!kElem) {
    gs = to_acc(g[0]);
    if (gs == A(1)) return;  // the common case: backward of a plain loss.backward()
  }
  constexpr int64_t CH = int64_t(kThreads) * V * kUnroll;
  const int64_t chunks = (n + CH - 1) / CH;
  for (int64_t k = blockIdx.x; k < chunks; k += gridDim.x) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i0 = k * CH + (int64_t(u) * kThreads + threadIdx.x) * V;
      if (kVec && i0 + V <= n) {
        Vec<T> a = ld_vec(grad + i0);
        Vec<T> b;
        if (kElem) b = ld_vec(g + i0);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          a.v[v] = from_acc<T>(to_acc(a.v[v]) * (kElem ? to_acc(b.v[v]) : gs));
        }
        st_vec(grad + i0, a);
      } else {
        for (int v = 0; v < V; ++v) {
          const int64_t i = i0 + v;
          if (i < n) grad[i] = from_acc<T>(to_acc(grad[i]) * (kElem ? to_acc(g[i]) : gs));
        }
      }
    }
  }
}

// mode 2: grad (N, C, D) *= g (N, D) broadcast over C. Block b handles a chunk of one n's C*D
// elements (one 64-bit division per block); kD1: D == 1 (one g value per n).
template <typename T, bool kD1, bool kVec>
__global__ void __launch_bounds__(kThreads)
    scale_position_kernel(T* __restrict__ grad, const T* __restrict__ g, int64_t N, int64_t CD,
                          int64_t D) {
  using A = acc_t<T>;
  constexpr int V = VecTraits<T>::kVec;
  constexpr int64_t CH = int64_t(kThreads) * V * kUnroll;
  const int64_t per_row = (CD + CH - 1) / CH;
  const int64_t blocks = N * per_row;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t n = b / per_row;
    const int64_t k = b - n * per_row;
    T* row = grad + n * CD;
    const T* gr = g + n * D;
    const A g1 = kD1 ? to_acc(gr[0]) : A(1);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j0 = k * CH + (int64_t(u) * kThreads + threadIdx.x) * V;
      if (kVec && kD1 && j0 + V <= CD) {
        Vec<T> a = ld_vec(row + j0);
#pragma unroll
        for (int v = 0; v < V; ++v) a.v[v] = from_acc<T>(to_acc(a.v[v]) * g1);
        st_vec(row + j0, a);
      } else {
        for (int v = 0; v < V; ++v) {
          const int64_t j = j0 + v;
          if (j < CD) {
            const A gv = kD1 ? g1 : to_acc(gr[j % D]);
            row[j] = from_acc<T>(to_acc(row[j]) * gv);
          }
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void launch_scale_grad(T* grad, const T* g, int mode, int64_t numel, int64_t N, int64_t C,
                       int64_t D, cudaStream_t stream) {
  if (numel == 0) return;
  constexpr int V = VecTraits<T>::kVec;
  constexpr int64_t CH = int64_t(kThreads) * V * kUnroll;
  const int64_t cap = int64_t(num_sms()) * (2048 / kThreads);
  if (mode == 0 || mode == 1) {
    const unsigned grid = grid_for((numel + CH - 1) / CH, cap);
    const bool vec = aligned16(grad) && (mode == 0 || aligned16(g));
    if (mode == 0 && vec) {
      launch_kernel<scale_kernel<T, false, true>>(grid, kThreads, 0, stream, grad, g, numel);
    } else if (mode == 0) {
      launch_kernel<scale_kernel<T, false, false>>(grid, kThreads, 0, stream, grad, g, numel);
    } else if (vec) {
      launch_kernel<scale_kernel<T, true, true>>(grid, kThreads, 0, stream, grad, g, numel);
    } else {
      launch_kernel<scale_kernel<T, true, false>>(grid, kThreads, 0, stream, grad, g, numel);
    }
    return;
  }
  const int64_t CD = C * D;
  const unsigned grid = grid_for(N * ((CD + CH - 1) / CH), cap);
  // Rows start 16-byte aligned when the base is and C*D*sizeof(T) is a multiple of 16.
  const bool vec = aligned16(grad) && (CD * int64_t(sizeof(T))) % 16 == 0;
  if (D == 1 && vec) {
    launch_kernel<scale_position_kernel<T, true, true>>(grid, kThreads, 0, stream, grad, g, N, CD,
                                                        D);
  } else if (D == 1) {
    launch_kernel<scale_position_kernel<T, true, false>>(grid, kThreads, 0, stream, grad, g, N,
                                                         CD, D);
  } else {
    launch_kernel<scale_position_kernel<T, false, false>>(grid, kThreads, 0, stream, grad, g, N,
                                                          CD, D);
  }
}

template void launch_scale_grad<double>(double*, const double*, int, int64_t, int64_t, int64_t,
                                        int64_t, cudaStream_t);
template void launch_scale_grad<float>(float*, const float*, int, int64_t, int64_t, int64_t,
                                       int64_t, cudaStream_t);
template void launch_scale_grad<__half>(__half*, const __half*, int, int64_t, int64_t, int64_t,
                                        int64_t, cudaStream_t);
template void launch_scale_grad<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, int,
                                               int64_t, int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace cuda
}  // namespace torch_losses
