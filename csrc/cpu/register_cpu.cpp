#include <ATen/ops/mul.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/cpu_backend.h"

namespace torch_losses {

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (!t.defined() || t.nbytes() < 4 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
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
