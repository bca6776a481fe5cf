// The cross-entropy kernels and launcher for double (csrc/cuda/cross_entropy_impl.cuh).
#include "cuda/cross_entropy_impl.cuh"

namespace torch_losses {
namespace cuda {
template void launch_cross_entropy<double>(const CrossEntropyArgs<double>&, cudaStream_t);
}  // namespace cuda
}  // namespace torch_losses
