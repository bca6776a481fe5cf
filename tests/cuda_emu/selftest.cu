// Kernels that break CUDA's rules on purpose, one per rule the emulator checks, so the tests can
// show that each is reported (kernel, block, thread) and never hangs or passes silently. The
// warp-intrinsic kernels also check CUDA's results for well-formed calls.
#include <cuda_runtime.h>

#include "cuda/common.cuh"

namespace {

using torch_losses::cuda::launch_kernel;
using torch_losses::cuda::ld_vec;

// case 0: thread 5 skips the barrier; 1: thread 40 exits before it; 2: two barriers at
// different lines; 3: lane 3 skips a shuffle; 4: lanes meet different shuffles; 5: a warp
// intrinsic with a partial mask; 6: thread 0 waits at __syncthreads, its warp at a shuffle
// (a deadlock).
__global__ void barrier_misuse_kernel(int which, float* out) {
  float v = float(threadIdx.x);
  switch (which) {
    case 0:
      if (threadIdx.x != 5) __syncthreads();
      break;
    case 1:
      if (threadIdx.x == 40) return;
      __syncthreads();
      break;
    case 2:
      if (threadIdx.x < 64) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      break;
    case 3:
      if (threadIdx.x != 3) v += __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 4:
      if (threadIdx.x & 1) v += __shfl_xor_sync(0xffffffffu, v, 1);
      else v += __shfl_down_sync(0xffffffffu, v, 1);
      break;
    case 5:
      v += __shfl_xor_sync(0x0000ffffu, v, 1);
      break;
    case 6:
      if (threadIdx.x == 0) __syncthreads();
      else v += __shfl_xor_sync(0xffffffffu, v, 1);
      break;
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Reads in[i] for i < n + extra: extra > 0 reads past the end.
__global__ void read_kernel(const float* in, int64_t n, float* out) {
  float s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += in[i];
  out[threadIdx.x] = s;
}

__global__ void vector_load_kernel(const float* in, float* out) {
  const auto v = ld_vec(in);
  out[threadIdx.x] = v.v[threadIdx.x & 3];
}

__global__ void assert_kernel(const float* in, float* out) {
  TL_DEVICE_ASSERT(in[threadIdx.x] >= 0, "selftest: negative input");
  out[threadIdx.x] = in[threadIdx.x];
}

// Every warp intrinsic once, results per thread: xor 1, down 3, up 2, idx 7 (width 8), ballot.
__global__ void warp_ops_kernel(int* out) {
  const int t = int(threadIdx.x);
  int* o = out + 5 * t;
  o[0] = __shfl_xor_sync(0xffffffffu, t, 1);
  o[1] = __shfl_down_sync(0xffffffffu, t, 3);
  o[2] = __shfl_up_sync(0xffffffffu, t, 2);
  o[3] = __shfl_sync(0xffffffffu, t, 7, 8);
  o[4] = int(__ballot_sync(0xffffffffu, t % 3 == 0));
  __syncwarp();
}

// __shared__ is one copy per block: every block sums its own threads' ids.
__global__ void shared_kernel(int* out) {
  __shared__ int s[256];
  s[threadIdx.x] = int(blockIdx.x * 1000 + threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) {
    int sum = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) sum += s[i];
    out[blockIdx.x] = sum;
  }
}

// Thread-block clusters of S blocks: each block fills its dynamic shared memory with
// 1000 blockIdx.x + threadIdx.x, and after the cluster barrier every thread reads element
// threadIdx.x of its neighbour's (rank k + 1 mod S) through cluster_map, writing (value, k).
// which: 0 as CUDA requires; 1 no second barrier (a block reads the shared memory of a block
// that has exited); 2 thread 5 of block 1 skips the barrier; 3 cluster_map of a global address.
__global__ void cluster_kernel(int which, unsigned S, int* out) {
  using namespace torch_losses::cuda;
  int* s = reinterpret_cast<int*>(dynamic_smem());
  const unsigned k = cluster_block_rank();
  s[threadIdx.x] = int(blockIdx.x * 1000 + threadIdx.x);
  if (which == 2 && blockIdx.x == 1 && threadIdx.x == 5) return;
  cluster_arrive();
  cluster_wait();
  const int* peer = cluster_map(which == 3 ? static_cast<const int*>(out) : s, (k + 1) % S);
  int* o = out + 2 * (blockIdx.x * blockDim.x + threadIdx.x);
  o[0] = peer[threadIdx.x];
  o[1] = int(k);
  if (which != 1) {
    cluster_arrive();
    cluster_wait();
  }
}

}  // namespace

extern "C" {

int tl_emu_selftest_barrier(int which, int blocks, int threads, float* out) {
  launch_kernel<barrier_misuse_kernel>(blocks, threads, 0, nullptr, which, out);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
int tl_emu_selftest_read(const float* in, int64_t n, int threads, float* out) {
  launch_kernel<read_kernel>(1, threads, 0, nullptr, in, n, out);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
int tl_emu_selftest_vector_load(const float* in, float* out) {
  launch_kernel<vector_load_kernel>(1, 32, 0, nullptr, in, out);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
int tl_emu_selftest_assert(const float* in, float* out) {
  launch_kernel<assert_kernel>(1, 64, 0, nullptr, in, out);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
int tl_emu_selftest_warp_ops(int threads, int* out) {
  launch_kernel<warp_ops_kernel>(1, threads, 0, nullptr, out);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
int tl_emu_selftest_shared(int blocks, int threads, int* out) {
  launch_kernel<shared_kernel>(blocks, threads, 0, nullptr, out);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}

// attrs: bit 0 raises the kernel's dynamic shared memory limit to smem, bit 1 allows clusters
// above 8 blocks (both reset to CUDA's defaults otherwise).
int tl_emu_selftest_cluster(int which, int clusters, int cluster, int threads, int smem,
                            int attrs, int* out) {
  cudaFuncSetAttribute(cluster_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       (attrs & 1) ? smem : 48 << 10);
  cudaFuncSetAttribute(cluster_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed,
                       (attrs & 2) ? 1 : 0);
  torch_losses::cuda::launch_cluster_kernel<cluster_kernel>(
      unsigned(clusters * cluster), threads, unsigned(cluster), size_t(smem), nullptr, which,
      unsigned(cluster), out);
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}

}  // extern "C"
