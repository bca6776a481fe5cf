// The CPU backend of the torch_losses ops (see csrc/ops.h for the interface).
#pragma once

#include "ops.h"

namespace torch_losses {

struct CpuBackend {
  template <template <typename> class Loss>
  static void pointwise(const PointwiseProblem& p);  // pointwise_cpu.cpp
  static void cross_entropy(const CrossEntropyProblem& p);  // cross_entropy_cpu.cpp
  static void scale_grad(at::Tensor& grad, const at::Tensor& grad_output);  // register_cpu.cpp
};

// A fresh output is faulted in page by page on its first write. Just before writing out[begin,
// end), this faults its pages in with one system call (Linux: MADV_POPULATE_WRITE), cheaper than
// a fault per 4 KB page; a page shared with a neighbouring range is only faulted in, never
// written. Huge pages are not asked for: on the benchmark VM their faults cost 70-190 ms of
// system time in some steps (benchmarks/NOTES.md, CPU section). Advisory only.
void prefault_for_write(const void* begin, const void* end);
template <typename T>
void prefault_for_write(T* out, int64_t begin, int64_t end) {
  if (out != nullptr && end > begin) prefault_for_write(out + begin, out + end);
}
// Outputs below this size likely come from the heap, already mapped.
constexpr int64_t kPrefaultMinBytes = int64_t(1) << 20;
// Outputs from this size on are written with non-temporal stores where a kernel can (several
// times a core's L2: they leave the caches before they are read again).
constexpr int64_t kStreamMinBytes = int64_t(8) << 20;
// ... and only in pieces of at least this size (a cross-entropy row): each piece starts with
// partial vectors and ends with a store fence, which short rows (131072 x 21 float32) paid for
// every few lines (17.7 ms against 8 ms with plain stores).
constexpr int64_t kStreamMinRowBytes = int64_t(16) << 10;

// Work units of the CPU kernels: fixed sizes, so that results do not depend on the thread count.
constexpr int64_t kCpuChunk = 2048;

}  // namespace torch_losses
