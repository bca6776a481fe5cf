#include <ATen/ops/mul.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/cpu_backend.h"

namespace torch_losses {

void prefault_for_write(const void* begin, const void* end) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kPage = 4096;
  const uintptr_t first = reinterpret_cast<uintptr_t>(begin) & ~(kPage - 1);
  const uintptr_t last = reinterpret_cast<uintptr_t>(end);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
#endif
}

void CpuBackend::scale_grad(at::Tensor& grad, const at::Tensor& grad_output) {
  if (grad_output.dim() == 0) {
    // Reading the scalar is free on the CPU; the common mean/sum case (1) costs nothing.
    if (grad_output.item<double>() != 1.0) grad.mul_(grad_output);
  } else if (grad_output.sizes() == grad.sizes()) {
    grad.mul_(grad_output);
  } else {
    grad.mul_(grad_output.unsqueeze(1));  // per cross-entropy position, broadcast over classes
  }
}

void register_vocab_parallel_cpu(torch::Library& m);  // vocab_parallel_cpu.cpp

TORCH_LIBRARY_IMPL(torch_losses, CPU, m) {
  register_ops<CpuBackend>(m);
  register_vocab_parallel_cpu(m);
}

}  // namespace torch_losses
