// The cross-entropy kernels and launcher for float (csrc/cuda/cross_entropy_impl.cuh).
#include "cuda/cross_entropy_impl.cuh"

namespace torch_losses {
namespace cuda {
template void launch_cross_entropy<float>(const CrossEntropyArgs<float>&, cudaStream_t);
}  // namespace cuda
}  // namespace torch_losses
