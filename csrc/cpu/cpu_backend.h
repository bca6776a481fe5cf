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

// Large fresh outputs are faulted in page by page on first write; on Linux ask for transparent
// huge pages (before the first touch), which cuts that cost several-fold. Advisory only.
void advise_huge_pages(const at::Tensor& t);

// Work units of the CPU kernels: fixed sizes, so that results do not depend on the thread count.
constexpr int64_t kCpuChunk = 2048;

}  // namespace torch_losses
