// The cross-entropy kernels and launcher for __half (csrc/cuda/cross_entropy_impl.cuh).
#include "cuda/cross_entropy_impl.cuh"

namespace torch_losses {
namespace cuda {
template void launch_cross_entropy<__half>(const CrossEntropyArgs<__half>&, cudaStream_t);
}  // namespace cuda
}  // namespace torch_losses
