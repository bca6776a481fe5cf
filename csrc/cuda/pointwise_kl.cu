// Pointwise KL divergence (probability and log-probability targets).
#include "cuda/pointwise_impl.cuh"

namespace torch_losses {
namespace cuda {
TL_INSTANTIATE_POINTWISE(KLDiv)
TL_INSTANTIATE_POINTWISE(KLDivLogTarget)
}  // namespace cuda
}  // namespace torch_losses
