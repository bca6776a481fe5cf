#include <ATen/ops/mul.h>
#include <torch/library.h>

#include "cpu/cpu_backend.h"

namespace torch_losses {

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

TORCH_LIBRARY_IMPL(torch_losses, CPU, m) { register_ops<CpuBackend>(m); }

}  // namespace torch_losses
