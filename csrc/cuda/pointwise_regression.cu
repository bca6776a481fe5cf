// Pointwise regression losses: Huber, smooth-L1, MSE, L1.
#include "cuda/pointwise_impl.cuh"

namespace torch_losses {
namespace cuda {
TL_INSTANTIATE_POINTWISE(Huber)
TL_INSTANTIATE_POINTWISE(SmoothL1)
TL_INSTANTIATE_POINTWISE(MSE)
TL_INSTANTIATE_POINTWISE(L1)
}  // namespace cuda
}  // namespace torch_losses
