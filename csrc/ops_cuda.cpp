// The CUDA backend of the torch_losses ops: device guard, current stream, dtype dispatch and
// scratch allocation, then the torch-free launchers of csrc/cuda/*.cu (see launchers.h).
// Nothing here reads device memory on the host: no synchronization on any path.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "cuda/launchers.h"
#include "ops.h"

namespace torch_losses {
namespace {

namespace tc = torch_losses::cuda;

template <template <typename> class Loss>
struct KindOf;
#define TL_KIND_OF(NAME)                                                  \
  template <>                                                             \
  struct KindOf<NAME> {                                                   \
    static constexpr tc::PointwiseKind value = tc::PointwiseKind::NAME; \
  };
TL_KIND_OF(BCEWithLogits)
TL_KIND_OF(Huber)
TL_KIND_OF(SmoothL1)
TL_KIND_OF(MSE)
TL_KIND_OF(L1)
TL_KIND_OF(BCE)
TL_KIND_OF(Hinge)
TL_KIND_OF(KLDiv)
TL_KIND_OF(KLDivLogTarget)
#undef TL_KIND_OF

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the CUDA type of the dtype.
template <typename F>
void dispatch_floating(at::ScalarType s, const F& f) {
  switch (s) {
    case at::kDouble: return f(Tag<double>{});
    case at::kFloat: return f(Tag<float>{});
    case at::kHalf: return f(Tag<__half>{});
    case at::kBFloat16: return f(Tag<__nv_bfloat16>{});
    default:
      TORCH_CHECK(false, "torch_losses: unsupported dtype ", s);
  }
}

template <typename T>
const T* cptr(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.data_ptr()) : nullptr;
}
template <typename T>
T* mptr(const Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

cudaStream_t current_stream(const Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

}  // namespace

struct CudaBackend {
  template <template <typename> class Loss>
  static void pointwise(const PointwiseProblem& p);
  static void cross_entropy(const CrossEntropyProblem& p);
  static void scale_grad(at::Tensor& grad, const at::Tensor& grad_output);
};

template <template <typename> class Loss>
void CudaBackend::pointwise(const PointwiseProblem& p) {
  const Tensor& x = p.input;
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = current_stream(x);
  const int64_t n = x.numel();
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    tc::PointwiseArgs<T> a;
    a.input = cptr<T>(p.input);
    a.target = cptr<T>(p.target);
    a.weight = cptr<T>(p.weight);
    a.aux = cptr<T>(p.aux);
    a.grad_output = cptr<T>(p.grad_output);
    a.grad_output_scalar = p.grad_output.defined() && p.grad_output.dim() == 0;
    a.skip_if_grad_output_is_one = p.skip_if_grad_output_is_one;
    a.loss = mptr<T>(p.loss);
    a.grad_input = mptr<T>(p.grad_input);
    a.grad_target = mptr<T>(p.grad_target);
    a.n = n;
    a.param = p.param;
    a.reduction = static_cast<int>(p.reduction);
    Tensor partials;  // freed after the launch: the caching allocator orders reuse on the stream
    if (p.loss.defined() && p.reduction != kNone) {
      partials = at::empty({std::max<int64_t>(1, tc::pointwise_num_partials<T>(n))},
                           x.options().dtype(accumulation_type(x.scalar_type())));
      a.partials = mptr<tc::acc_t<T>>(partials);
    }
    tc::launch_pointwise<KindOf<Loss>::value, T>(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaBackend::cross_entropy(const CrossEntropyProblem& p) {
  const Tensor& x = p.input;
  c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = current_stream(x);
  const int64_t rows = p.N * p.D;
  dispatch_floating(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = tc::acc_t<T>;
    const bool per_class_weights =
        p.weight.defined() && (p.probability_target || p.label_smoothing != 0.0);
    Tensor scratch = at::empty({tc::ce_scratch_size(rows, p.C, per_class_weights)},
                               x.options().dtype(accumulation_type(x.scalar_type())));
    tc::CrossEntropyArgs<T> a;
    a.input = cptr<T>(p.input);
    if (p.probability_target) {
      a.target_prob = cptr<T>(p.target);
    } else {
      a.target_index = cptr<int64_t>(p.target);
    }
    a.weight = cptr<A>(p.weight);
    a.grad_output = cptr<T>(p.grad_output);
    a.grad_output_scalar = p.grad_output.defined() && p.grad_output.dim() == 0;
    a.skip_if_grad_output_is_one = p.skip_if_grad_output_is_one;
    a.loss = mptr<T>(p.loss);
    a.row_stats = mptr<A>(p.row_stats);
    a.grad_input = mptr<T>(p.grad_input);
    a.grad_target = mptr<T>(p.grad_target);
    a.scratch = mptr<A>(scratch);
    a.N = p.N;
    a.C = p.C;
    a.D = p.D;
    a.rows_strided = p.rows_strided;
    if (p.rows_strided) {
      a.x_stride_n = p.input.stride(0);
      a.x_stride_d = p.input.stride(2);
      if (p.probability_target) {
        a.t_stride_n = p.target.stride(0);
        a.t_stride_d = p.target.stride(2);
      }
    }
    a.ignore_index = p.ignore_index;
    a.label_smoothing = p.label_smoothing;
    a.reduction = static_cast<int>(p.reduction);
    a.z_loss = p.z_loss;
    a.softcap = p.softcap;
    tc::launch_cross_entropy<T>(a, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void CudaBackend::scale_grad(at::Tensor& grad, const at::Tensor& grad_output) {
  c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = current_stream(grad);
  const int64_t numel = grad.numel();
  int mode = 2;
  int64_t N = 0, C = 0, D = 0;
  if (grad_output.dim() == 0) {
    mode = 0;  // the scalar is read on the device; the kernel exits at once when it is 1
  } else if (grad_output.sizes() == grad.sizes()) {
    mode = 1;
  } else {
    N = grad.size(0);
    C = grad.size(1);
    D = (N * C) == 0 ? 0 : numel / (N * C);
  }
  if (numel == 0) return;
  dispatch_floating(grad.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    tc::launch_scale_grad<T>(mptr<T>(grad), cptr<T>(grad_output), mode, numel, N, C, D, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(torch_losses, CUDA, m) { register_ops<CudaBackend>(m); }

}  // namespace torch_losses
