// The cross-entropy kernels and launcher for __nv_bfloat16 (csrc/cuda/cross_entropy_impl.cuh).
#include "cuda/cross_entropy_impl.cuh"

namespace torch_losses {
namespace cuda {
template void launch_cross_entropy<__nv_bfloat16>(const CrossEntropyArgs<__nv_bfloat16>&,
                                                  cudaStream_t);
}  // namespace cuda
}  // namespace torch_losses
