// Pointwise losses on probabilities/logits: BCE-with-logits, BCE, hinge.
#include "cuda/pointwise_impl.cuh"

namespace torch_losses {
namespace cuda {
TL_INSTANTIATE_POINTWISE(BCEWithLogits)
TL_INSTANTIATE_POINTWISE(BCE)
TL_INSTANTIATE_POINTWISE(Hinge)
}  // namespace cuda
}  // namespace torch_losses
