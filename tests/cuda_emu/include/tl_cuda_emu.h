// The CUDA-on-CPU emulator used by the tests (tests/cuda_emu): what the torch_losses kernels
// (csrc/cuda/*.cu) need from CUDA, for the host C++ compiler. The .cu files are compiled
// unchanged with `g++ -x c++ -I tests/cuda_emu/include -I csrc`; the shim headers cuda_runtime.h,
// cuda_runtime_api.h, cuda_fp16.h and cuda_bf16.h of this folder include this file.
//
// Execution model (runtime.cpp): the blocks of a launch run one after another; the threads of a
// block are fibers (64 KiB stacks) that switch only at barriers. Every __syncthreads is a
// rendezvous of the whole block and every warp intrinsic one of the 32 lanes of a warp; a thread
// that skips a barrier, exits while others wait, or meets another barrier is reported as an error
// naming the kernel, the block and the thread. Errors are sticky (as CUDA's): the launch and
// every later one do nothing until tl_emu_take_error() is called.
// Thread-block clusters (sm_90, launch_cluster): the blocks of one cluster run together, their
// threads fibers of one scheduler, so a cluster barrier (arrive / wait) is a rendezvous of every
// thread of the cluster (each block runs as far as it can before the next one goes on, so a
// block that skips a barrier runs ahead); each block has its own dynamic shared memory
// (dynamic_smem), and cluster_map(p, rank) returns the address at p's offset in block rank's
// (distributed shared memory). A block's shared memory becomes inaccessible when its threads
// have all exited, so a late access from another block of the cluster faults and is reported.
// A kernel launched in clusters must keep its shared data in dynamic shared memory: a static
// __shared__ variable is one copy per function here.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>

#define TL_CUDA_EMULATOR 1

// ---- declaration specifiers ------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// One copy per function: the blocks run one after another, so it is one copy per block.
#define __shared__ static
#define __align__(n) alignas(n)

// ---- built-in types and variables ------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) int4 {
  int x, y, z, w;
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 14,
};
struct cudaFuncAttributes {
  int binaryVersion;  // the emulated device's compute capability (10 major + minor)
  int ptxVersion;
  int maxDynamicSharedSizeBytes;
};
// cudaLaunchKernelEx's configuration: only the cluster dimension attribute is emulated.
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct {
    unsigned x, y, z;
  } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim;
  dim3 blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

// Set by the scheduler before a fiber runs (all fibers share one OS thread).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---- runtime API (the emulated devices: tl_emu_configure_device) ------------------------------
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
// Resident blocks per SM of a kernel: the emulated device's answer (it has no registers to
// count), at most 2048 threads per SM; varies between devices so that grids built on it do too.
cudaError_t tl_emu_occupancy(int* num_blocks, int block_size);
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, Kernel,
                                                          int block_size, size_t /*smem*/) {
  return tl_emu_occupancy(num_blocks, block_size);
}
// Per-kernel attributes (the kernel's address is its key): the dynamic shared memory limit
// (48 KiB until raised, as CUDA's) and whether clusters above 8 blocks are allowed.
cudaError_t tl_emu_func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
cudaError_t tl_emu_func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t tl_emu_max_active_clusters(int* num_clusters, const void* kernel,
                                       const cudaLaunchConfig_t* config);
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  return tl_emu_func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, Kernel* kernel) {
  return tl_emu_func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveClusters(int* num_clusters, Kernel* kernel,
                                           const cudaLaunchConfig_t* config) {
  return tl_emu_max_active_clusters(num_clusters, reinterpret_cast<const void*>(kernel), config);
}

// A failed device assert: reported as the launch's error; the thread stops (the block is
// abandoned, as a CUDA kernel stops at a trap). Named by the macro below because glibc's
// <assert.h> declares __assert_fail itself.
extern "C" [[noreturn]] void tl_emu_assert_fail(const char* msg, const char* file,
                                                unsigned int line, const char* func) noexcept;
#define __assert_fail tl_emu_assert_fail

namespace tl_emu {

// The scheduler: runs body(ctx) once per thread of every block of the grid; the blocks of a
// cluster (cluster blocks along x, 1: no cluster) together, each with `smem` bytes of dynamic
// shared memory. `key`: the kernel's address (its attributes).
void run_grid(const char* kernel, const void* key, dim3 grid, dim3 block, unsigned cluster,
              size_t smem, void (*body)(void*), void* ctx);

// The running block's dynamic shared memory (16-byte aligned; NaN-patterned at the start).
void* dynamic_smem();
// Thread-block clusters: the block's rank in its cluster, the cluster barrier in two halves
// (every thread of the cluster arrives, then waits for the others; arrive orders the thread's
// earlier memory accesses before the others' accesses after their wait), and the address at
// p's offset in the dynamic shared memory of block `rank` of the cluster.
unsigned cluster_rank();
void cluster_arrive(const char* file, int line);
void cluster_wait(const char* file, int line);
void* cluster_map(const void* p, unsigned rank);

// Reports an error in the running thread (kernel, block, thread) and stops it.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

void sync_block(const char* file, int line);

enum WarpOp : int { kShflXor, kShflDown, kShflUp, kShflIdx, kBallot, kSyncWarp };
// One warp intrinsic: a rendezvous of the 32 lanes; returns this lane's result bits.
uint64_t warp_op(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file,
                 int line);

inline void check_aligned(const void* p, size_t align, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    fail("misaligned address %p for a %s (needs %zu-byte alignment)", p, what, align);
  }
}

template <auto kKernel, typename Tuple>
void run_kernel(void* ctx) {
  // Each thread gets its own copy of the arguments, as kernel parameters are.
  Tuple args = *static_cast<const Tuple*>(ctx);
  std::apply(kKernel, args);
}

// The kernel's name from the template argument (__PRETTY_FUNCTION__: "... [with auto kKernel =
// NAME; ...]").
template <auto kKernel>
const char* kernel_name() {
  static char name[512];
  if (name[0] == 0) {
    const char* s = __PRETTY_FUNCTION__;
    const char* b = strstr(s, "kKernel = ");
    b = b != nullptr ? b + 10 : s;
    size_t n = strcspn(b, ";]");
    if (n >= sizeof(name)) n = sizeof(name) - 1;
    memcpy(name, b, n);
    name[n] = 0;
  }
  return name;
}

template <auto kKernel, typename... Args>
void launch_cluster(dim3 grid, dim3 block, unsigned cluster, size_t smem, cudaStream_t,
                    const Args&... args) {
  using Tuple = std::tuple<Args...>;
  Tuple t(args...);
  run_grid(kernel_name<kKernel>(), reinterpret_cast<const void*>(kKernel), grid, block, cluster,
           smem, &run_kernel<kKernel, Tuple>, &t);
}

template <auto kKernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
  launch_cluster<kKernel>(grid, block, 1, smem, stream, args...);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of <= 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace tl_emu

// ---- barriers and warp intrinsics ------------------------------------------------------------
// The call site (file, line) identifies a barrier: every thread must meet the same one.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  tl_emu::sync_block(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  tl_emu::warp_op(tl_emu::kSyncWarp, mask, 0, 0, 32, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return tl_emu::from_bits<T>(
      tl_emu::warp_op(tl_emu::kShflXor, mask, tl_emu::to_bits(v), lane_mask, width, file, line));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return tl_emu::from_bits<T>(tl_emu::warp_op(tl_emu::kShflDown, mask, tl_emu::to_bits(v),
                                              int(delta), width, file, line));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return tl_emu::from_bits<T>(tl_emu::warp_op(tl_emu::kShflUp, mask, tl_emu::to_bits(v),
                                              int(delta), width, file, line));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return tl_emu::from_bits<T>(
      tl_emu::warp_op(tl_emu::kShflIdx, mask, tl_emu::to_bits(v), src_lane, width, file, line));
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return unsigned(tl_emu::warp_op(tl_emu::kBallot, mask, pred != 0, 0, 32, file, line));
}

// ---- memory intrinsics: CUDA's alignment rule is checked -------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  tl_emu::check_aligned(p, alignof(T) > sizeof(T) ? alignof(T) : sizeof(T), "__ldg");
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  tl_emu::check_aligned(p, alignof(T) > sizeof(T) ? alignof(T) : sizeof(T), "__ldcs");
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  tl_emu::check_aligned(p, alignof(T) > sizeof(T) ? alignof(T) : sizeof(T), "__stcs");
  *p = v;
}

// ---- math: the host libm; fast intrinsics return it moved by their documented worst-case error
// (CUDA C++ Programming Guide, intrinsic functions) in the direction fast_math_direction says:
// +1 up (the default), -1 down, 0 the libm value. The .ftz forms flush subnormal inputs and
// results to zero as on the GPU; ftz = false models the ex2/lg2.approx.f32 forms, which keep them.
namespace tl_emu {
inline int fast_math_direction = 1;

inline float flush_subnormal(float v) {
  return (v != 0.0f && fabsf(v) < 1.17549435e-38f) ? copysignf(0.0f, v) : v;
}
// v moved by `ulps` units in the last place (finite, nonzero v; 0, inf and NaN are kept). A
// move toward zero stops there: an approximation keeps its result's sign.
inline float move_ulps(float v, int ulps) {
  if (fast_math_direction == 0 || v == 0.0f || !std::isfinite(v)) return v;
  const float to = fast_math_direction > 0 ? INFINITY : -INFINITY;
  for (int i = 0; i < ulps && std::isfinite(v) && v != 0.0f; ++i) {
    const float next = nextafterf(v, to);
    v = std::signbit(next) != std::signbit(v) ? copysignf(0.0f, v) : next;
  }
  return v;
}
// __expf: 2 + floor(|1.173 x|) ulp; exp(+-0) = 1 exactly (PTX ex2: +-0 -> +1).
inline float approx_exp(float x, bool ftz) {
  if (ftz) x = flush_subnormal(x);
  if (x == 0.0f) return 1.0f;
  const float r = move_ulps(expf(x), 2 + int(floorf(fminf(fabsf(1.173f * x), 1e6f))));
  return ftz ? flush_subnormal(r) : r;
}
// __logf: absolute error 2^-21.41 for x in [0.5, 2], else 3 ulp.
inline float approx_log(float x, bool ftz) {
  if (ftz) x = flush_subnormal(x);
  const float r = logf(x);
  if (x >= 0.5f && x <= 2.0f) return r + float(fast_math_direction) * 3.5887879e-7f;  // 2^-21.41
  return move_ulps(r, 3);
}
// rcp.approx.ftz.f32: 1 ulp (PTX ISA), over the full range.
inline float approx_rcp(float b) { return move_ulps(1.0f / flush_subnormal(b), 1); }
}  // namespace tl_emu
inline float __expf(float x) { return tl_emu::approx_exp(x, true); }
inline float __logf(float x) { return tl_emu::approx_log(x, true); }
// 2 ulp for |b| in [2^-126, 2^126]; 0 for |b| in (2^126, 2^128), as documented.
inline float __fdividef(float a, float b) {
  const float ab = fabsf(b);
  if (ab > 8.50705917e37f && std::isfinite(b)) return std::isinf(a) ? NAN : 0.0f * a / b;
  const float r = a / b;
  return ab >= 1.17549435e-38f ? tl_emu::move_ulps(r, 2) : r;
}
// Products that must not be contracted into an FMA (the emulator build allows contraction, as
// nvcc does): the result passes through memory.
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;
  return r;
}
inline double __dmul_rn(double a, double b) {
  volatile double r = a * b;
  return r;
}
