// Device helpers shared by the torch_losses CUDA kernels (torch-free: CUDA headers only).
#pragma once

#include <assert.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "cuda/launchers.h"

namespace torch_losses {
namespace cuda {

// A device-side assert that is not compiled out by NDEBUG (as torch's CUDA_KERNEL_ASSERT): the
// message names the failed check; the kernel stops and the next CUDA call reports
// "device-side assert triggered".
#define TL_DEVICE_ASSERT(cond, msg)                      \
  do {                                                   \
    if (!(cond)) {                                       \
      __assert_fail(msg, __FILE__, __LINE__, __func__);  \
    }                                                    \
  } while (0)

// ---- conversions ----------------------------------------------------------------------------
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- launches --------------------------------------------------------------------------------
// Every kernel is launched through here: <<<...>>> under nvcc, the CPU emulator's launch in its
// build (tests/cuda_emu compiles these sources unchanged with the host compiler).
template <auto kKernel, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          const Args&... args) {
#if defined(__CUDACC__)
  kKernel<<<grid, block, smem, stream>>>(args...);
#elif defined(TL_CUDA_EMULATOR)
  tl_emu::launch<kKernel>(grid, block, smem, stream, args...);
#else
#error "csrc/cuda is compiled by nvcc, or by the host compiler with tests/cuda_emu/include"
#endif
}

// Launches kKernel in clusters of `cluster` blocks along x (sm_90; grid.x a multiple of it):
// cudaLaunchKernelEx with the cluster dimension attribute under nvcc.
template <auto kKernel, typename... Args>
inline void launch_cluster_kernel(dim3 grid, dim3 block, unsigned cluster, size_t smem,
                                  cudaStream_t stream, const Args&... args) {
#if defined(__CUDACC__)
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  cudaLaunchKernelEx(&config, kKernel, args...);
#elif defined(TL_CUDA_EMULATOR)
  tl_emu::launch_cluster<kKernel>(grid, block, cluster, smem, stream, args...);
#else
#error "csrc/cuda is compiled by nvcc, or by the host compiler with tests/cuda_emu/include"
#endif
}

// ---- thread-block clusters and dynamic shared memory (device side) -----------------------------
// The block's dynamic shared memory, 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_smem() {
#if defined(TL_CUDA_EMULATOR)
  return static_cast<unsigned char*>(tl_emu::dynamic_smem());
#else
  extern __shared__ __align__(16) unsigned char tl_dynamic_smem[];
  return tl_dynamic_smem;
#endif
}

// sm_90 cluster intrinsics (callers compile them only where __CUDA_ARCH__ >= 900, or in the
// emulator): the block's rank in its cluster; the cluster barrier in two halves (arrive has
// release semantics, wait acquire: shared memory written before the arrive is visible to every
// block of the cluster after its wait); the address at p's offset in the shared memory of block
// `rank` of the cluster (distributed shared memory).
#if defined(TL_CUDA_EMULATOR) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
#define TL_HAVE_CLUSTERS 1
__device__ __forceinline__ unsigned cluster_block_rank() {
#if defined(TL_CUDA_EMULATOR)
  return tl_emu::cluster_rank();
#else
  return __clusterRelativeBlockRank();
#endif
}
#if defined(TL_CUDA_EMULATOR)
inline void cluster_arrive(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  tl_emu::cluster_arrive(file, line);
}
inline void cluster_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  tl_emu::cluster_wait(file, line);
}
#else
__device__ __forceinline__ void cluster_arrive() { __cluster_barrier_arrive(); }
__device__ __forceinline__ void cluster_wait() { __cluster_barrier_wait(); }
#endif
template <typename P>
__device__ __forceinline__ P* cluster_map(P* p, unsigned rank) {
#if defined(TL_CUDA_EMULATOR)
  return static_cast<P*>(tl_emu::cluster_map(p, rank));
#else
  return static_cast<P*>(__cluster_map_shared_rank(p, rank));
#endif
}
#endif

// ---- 16-byte vectors ------------------------------------------------------------------------
template <typename T>
struct VecTraits {
  static constexpr int kVec = 16 / sizeof(T);
};

template <typename T>
struct alignas(16) Vec {
  T v[VecTraits<T>::kVec];
};

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// One 16-byte load or store: on the GPU a misaligned address faults; the emulator checks it.
template <typename T>
__device__ __forceinline__ Vec<T> ld_vec(const T* p) {
#if defined(TL_CUDA_EMULATOR)
  tl_emu::check_aligned(p, 16, "16-byte vector load");
#endif
  return *reinterpret_cast<const Vec<T>*>(p);
}
template <typename T>
__device__ __forceinline__ void st_vec(T* p, const Vec<T>& v) {
#if defined(TL_CUDA_EMULATOR)
  tl_emu::check_aligned(p, 16, "16-byte vector store");
#endif
  *reinterpret_cast<Vec<T>*>(p) = v;
}

// ---- block reductions (fixed order: deterministic) ------------------------------------------
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; the result is valid in thread 0. blockDim.x a multiple of 32, <= 1024.
// Ends with a __syncthreads-free path for thread 0; callers that reuse `smem` must sync.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* smem /* >= 32 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : A(0);
    v = warp_sum(v);
  }
  return v;
}

// ---- deterministic two-stage sums -----------------------------------------------------------
template <typename A>
struct ArrayLoad {
  const A* p;
  __device__ __forceinline__ A operator()(int64_t i) const { return p[i]; }
};

constexpr int kReduceThreads = 256;
static_assert(kReduceChunk % kReduceThreads == 0, "chunk must be a multiple of the block");

// Stage 1: partials[k] = sum of load(i) over chunk k, in a fixed order.
template <typename A, typename Load>
__global__ void __launch_bounds__(kReduceThreads)
    chunk_sum_kernel(Load load, int64_t n, int64_t num_chunks, A* __restrict__ partials) {
  __shared__ A smem[32];
  for (int64_t k = blockIdx.x; k < num_chunks; k += gridDim.x) {
    const int64_t base = k * kReduceChunk;
    A s = 0;
#pragma unroll 4
    for (int j = 0; j < kReduceChunk / kReduceThreads; ++j) {
      const int64_t i = base + int64_t(j) * kReduceThreads + threadIdx.x;
      if (i < n) s += load(i);
    }
    s = block_sum(s, smem);
    if (threadIdx.x == 0) partials[k] = s;
  }
}

// Stage 2 (one block): total = sum of load(i), i < n, in a fixed order; writes
// total / denom (denom read from *denom_ptr when given) to out (as T) and/or out_acc. A zero
// denom gives NaN, as torch's mean over nothing (no elements, or a zero total class weight).
constexpr int kFinalThreads = 1024;
template <typename A, typename T, typename Load>
__global__ void __launch_bounds__(kFinalThreads)
    final_sum_kernel(Load load, int64_t n, const A* denom_ptr, A denom, T* out, A* out_acc) {
  __shared__ A smem[32];
  A s = 0;
  for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) s += load(i);
  s = block_sum(s, smem);
  if (threadIdx.x == 0) {
    const A d = denom_ptr != nullptr ? *denom_ptr : denom;
    const A r = d == A(0) ? A(NAN) : s / d;
    if (out != nullptr) *out = from_acc<T>(r);
    if (out_acc != nullptr) *out_acc = r;
  }
}

constexpr int kMaxDevices = 128;

// Per-device attributes, read once. Atomics: launches may come from several host threads
// (relaxed: every thread that misses reads and stores the same value).
inline int cached_device_attribute(cudaDeviceAttr attr, std::atomic<int>* cache, int fallback) {
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= kMaxDevices) dev = 0;
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    cudaDeviceGetAttribute(&v, attr, dev);
    if (v <= 0) v = fallback;
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

inline int num_sms() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_device_attribute(cudaDevAttrMultiProcessorCount, cache, 108);
}

inline int64_t l2_bytes() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_device_attribute(cudaDevAttrL2CacheSize, cache, 40 << 20);
}

inline int compute_capability_major() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_device_attribute(cudaDevAttrComputeCapabilityMajor, cache, 1);
}

// Dynamic shared memory one block may opt in to (227 KiB on sm_90, 163 KiB on sm_80).
inline int64_t smem_optin_bytes() {
  static std::atomic<int> cache[kMaxDevices];
  return cached_device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, cache, 48 << 10);
}

// Whether kKernel, launched in clusters of `cluster` blocks of `threads` threads with `smem`
// bytes of dynamic shared memory, runs on the current device with its sm_90 code. Once per
// device and kernel: the compute capability and the code's (cudaFuncGetAttributes: a build
// without sm_90 code JIT-compiles compute_80 PTX there), and the attributes that allow up to
// the device's opt-in shared memory and clusters of up to 16 (non-portable). Clusters of at most
// 8 (portable) launch whenever one block fits an SM; larger ones are asked of
// cudaOccupancyMaxActiveClusters (a host-side query, no device sync) at each call.
template <auto kKernel>
inline bool cluster_launch_ok(unsigned cluster, int threads, size_t smem) {
  static std::atomic<int> ready[kMaxDevices];  // 0 unknown, 1 yes, -1 no
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= kMaxDevices) dev = 0;
  int r = ready[dev].load(std::memory_order_relaxed);
  if (r == 0) {
    r = -1;
    if (compute_capability_major() >= 9) {
      cudaFuncAttributes fa;
      const bool ok =
          cudaFuncGetAttributes(&fa, kKernel) == cudaSuccess && fa.binaryVersion >= 90 &&
          cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(smem_optin_bytes())) == cudaSuccess &&
          cudaFuncSetAttribute(kKernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
              cudaSuccess;
      if (!ok) cudaGetLastError();  // a refused query is not the next launch's error
      r = ok ? 1 : -1;
    }
    ready[dev].store(r, std::memory_order_relaxed);
  }
  if (r < 0 || cluster < 2 || cluster > 16 || int64_t(smem) > smem_optin_bytes()) return false;
  if (cluster <= 8) return true;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster);
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = smem;
  config.attrs = attr;
  config.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kKernel, &config) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return clusters > 0;
}

// sum over i < n of load(i), divided by denom (or *denom_ptr); written to out / out_acc.
// partials: reduce_num_chunks(n) values of scratch (used only for large n).
template <typename A, typename T, typename Load>
void deterministic_sum(Load load, int64_t n, A* partials, const A* denom_ptr, A denom, T* out,
                       A* out_acc, cudaStream_t stream) {
  // One block only while each of its threads loads <= 8 values: a longer serial chain of
  // (possibly dependent) loads in one block costs more than the second launch.
  if (n <= 2 * kReduceChunk) {
    launch_kernel<final_sum_kernel<A, T, Load>>(1, kFinalThreads, 0, stream, load, n, denom_ptr,
                                                denom, out, out_acc);
    return;
  }
  const int64_t chunks = reduce_num_chunks(n);
  const int64_t grid = chunks < int64_t(num_sms()) * 8 ? chunks : int64_t(num_sms()) * 8;
  launch_kernel<chunk_sum_kernel<A, Load>>(unsigned(grid), kReduceThreads, 0, stream, load, n,
                                           chunks, partials);
  launch_kernel<final_sum_kernel<A, T, ArrayLoad<A>>>(1, kFinalThreads, 0, stream,
                                                      ArrayLoad<A>{partials}, chunks, denom_ptr,
                                                      denom, out, out_acc);
}

// Blocks of kKernel (at `threads` threads, no dynamic shared memory) that one SM holds at once,
// as its registers and shared memory allow: read once per device.
template <auto kKernel>
inline int resident_blocks_per_sm(int threads) {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= kMaxDevices) dev = 0;
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kKernel, threads, 0) != cudaSuccess ||
        v <= 0) {
      v = 1;
    }
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

inline unsigned grid_for(int64_t blocks, int64_t cap) {
  if (blocks < 1) blocks = 1;
  return unsigned(blocks < cap ? blocks : cap);
}

}  // namespace cuda
}  // namespace torch_losses
