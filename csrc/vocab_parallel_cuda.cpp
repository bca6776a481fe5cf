// The CUDA backend of the vocab-parallel cross-entropy ops: checks (csrc/vocab_parallel_ops.h),
// allocation, device guard, current stream and dtype dispatch, then the torch-free launchers of
// csrc/cuda/vocab_parallel.cu. No host synchronization: a bad target is a device-side assert.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/vocab_parallel_launchers.h"
#include "vocab_parallel_ops.h"

namespace torch_losses {
namespace {

namespace tc = torch_losses::cuda;

// Calls f(T{}) with T the CUDA type of the dtype.
template <typename F>
void dispatch_cuda_floating(at::ScalarType s, const F& f) {
  switch (s) {
    case at::kDouble: return f(double{});
    case at::kFloat: return f(float{});
    case at::kHalf: return f(__half{});
    case at::kBFloat16: return f(__nv_bfloat16{});
    default: TORCH_CHECK(false, "torch_losses: unsupported dtype ", s);
  }
}

template <typename T>
const T* cptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<const T*>(t.data_ptr()) : nullptr;
}
template <typename T>
T* mptr(const Tensor& t) {
  return t.defined() && t.numel() > 0 ? static_cast<T*>(t.data_ptr()) : nullptr;
}

Tensor vocab_parallel_ce_stats_cuda(const Tensor& logits, const Tensor& target,
                                    const OptTensor& weight, int64_t vocab_start,
                                    int64_t ignore_index, double label_smoothing,
                                    double softcap) {
  VocabParallelShard s = check_vocab_parallel_shard(logits, target, weight, softcap);
  c10::cuda::CUDAGuard guard(s.logits.device());
  Tensor out = at::empty({s.N, vocab_parallel::kLocalColumns},
                         s.logits.options().dtype(accumulation_type(s.logits.scalar_type())));
  dispatch_cuda_floating(s.logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = tc::acc_t<T>;
    tc::VocabParallelStatsArgs<T> a;
    a.logits = cptr<T>(s.logits);
    a.target_index = s.probs ? nullptr : cptr<int64_t>(s.target);
    a.target_prob = s.probs ? cptr<T>(s.target) : nullptr;
    a.weight = cptr<A>(s.weight);
    a.stats = mptr<A>(out);
    a.N = s.N;
    a.V = s.V;
    a.vocab_start = vocab_start;
    a.ignore_index = ignore_index;
    a.softcap = softcap;
    a.smoothing = label_smoothing > 0;
    tc::launch_vocab_parallel_stats<T>(
        a, c10::cuda::getCurrentCUDAStream(s.logits.device().index()).stream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<Tensor, Tensor, Tensor> vocab_parallel_ce_grad_cuda(
    const Tensor& logits, const Tensor& target, const OptTensor& weight, const Tensor& maxima,
    const Tensor& row_sums, const Tensor& vocab_size, const Tensor& scale, int64_t vocab_start,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    bool input_grad, bool target_grad) {
  VocabParallelShard s = check_vocab_parallel_shard(logits, target, weight, softcap);
  TORCH_CHECK(!target_grad || s.probs, "torch_losses: class-index targets have no gradient");
  check_global_statistics(s, maxima, row_sums, vocab_size, scale);
  c10::cuda::CUDAGuard guard(s.logits.device());
  const auto acc = accumulation_type(s.logits.scalar_type());
  Tensor loss = at::empty({s.N}, s.logits.options().dtype(acc));
  Tensor grad_input = grad_like(s.logits, input_grad);
  Tensor grad_target = target_grad ? grad_like(s.target, true) : Tensor();
  dispatch_cuda_floating(s.logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = tc::acc_t<T>;
    tc::VocabParallelGradArgs<T> a;
    a.logits = cptr<T>(s.logits);
    a.target_index = s.probs ? nullptr : cptr<int64_t>(s.target);
    a.target_prob = s.probs ? cptr<T>(s.target) : nullptr;
    a.weight = cptr<A>(s.weight);
    a.maxima = cptr<double>(maxima);
    a.row_sums = cptr<A>(row_sums);
    a.vocab_size = cptr<A>(vocab_size);
    a.scale = cptr<A>(scale);
    a.loss = mptr<A>(loss);
    a.grad_input = mptr<T>(grad_input);
    a.grad_target = mptr<T>(grad_target);
    a.N = s.N;
    a.V = s.V;
    a.vocab_start = vocab_start;
    a.ignore_index = ignore_index;
    a.label_smoothing = label_smoothing;
    a.z_loss = z_loss;
    a.softcap = softcap;
    a.probs = s.probs;
    tc::launch_vocab_parallel_grad<T>(
        a, c10::cuda::getCurrentCUDAStream(s.logits.device().index()).stream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, or_empty(grad_input, s.logits), or_empty(grad_target, s.logits)};
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_losses, CUDA, m) {
  m.impl("vocab_parallel_ce_stats", &vocab_parallel_ce_stats_cuda);
  m.impl("vocab_parallel_ce_grad", &vocab_parallel_ce_grad_cuda);
}

}  // namespace torch_losses
