// Argument checks of the vocab-parallel cross-entropy ops, shared by the CPU
// (csrc/cpu/vocab_parallel_cpu.cpp) and CUDA (csrc/vocab_parallel_cuda.cpp) backends.
#pragma once

#include "losses/vocab_parallel.h"
#include "ops.h"

namespace torch_losses {

// The checked, contiguous arguments shared by both ops.
struct VocabParallelShard {
  Tensor logits, target, weight;
  bool probs = false;
  int64_t N = 0, V = 0;  // rows, classes of this shard
};

inline VocabParallelShard check_vocab_parallel_shard(const Tensor& logits, const Tensor& target,
                                                     const OptTensor& weight, double softcap) {
  check_floating(logits, "logits");
  if (softcap != 0.0) check_softcap_range(softcap, logits.scalar_type());  // 0: off
  TORCH_CHECK(logits.dim() == 2, "torch_losses: vocab-parallel ops take logits (N, V_local), got ",
              logits.sizes());
  TORCH_CHECK(target.device() == logits.device(), "torch_losses: target is on ", target.device(),
              " but logits are on ", logits.device());
  VocabParallelShard s;
  s.N = logits.size(0);
  s.V = logits.size(1);
  s.probs = target.dim() == 2;
  if (s.probs) {
    check_like_input(logits, target, "target");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong,
                "torch_losses: class-index target must be int64, got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 1 && target.size(0) == s.N, "torch_losses: target has shape ",
                target.sizes(), ", expected (", s.N, ")");
  }
  s.logits = logits.contiguous();
  s.target = target.contiguous();
  if (weight.has_value()) {
    TORCH_CHECK(weight->device() == logits.device() &&
                    weight->scalar_type() == accumulation_type(logits.scalar_type()) &&
                    weight->dim() == 1 && weight->size(0) == s.V,
                "torch_losses: weight must be this shard's (V_local) class weights in the "
                "accumulation dtype, got ", weight->scalar_type(), " of shape ", weight->sizes());
    s.weight = weight->contiguous();
  }
  return s;
}

// The grad op's global statistics: maxima (3, N) float64, row_sums (N, kSumColumns),
// vocab_size and scale 0-dim, in the accumulation dtype, on the logits' device.
inline void check_global_statistics(const VocabParallelShard& s, const Tensor& maxima,
                                    const Tensor& row_sums, const Tensor& vocab_size,
                                    const Tensor& scale) {
  const auto acc = accumulation_type(s.logits.scalar_type());
  auto check = [&](const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype,
                   const char* name) {
    TORCH_CHECK(t.device() == s.logits.device() && t.scalar_type() == dtype &&
                    t.sizes() == shape && t.is_contiguous(),
                "torch_losses: ", name, " must be contiguous ", dtype, " of shape ", shape,
                " on ", s.logits.device(), ", got ", t.scalar_type(), " of shape ", t.sizes());
  };
  check(maxima, {3, s.N}, at::kDouble, "maxima");
  check(row_sums, {s.N, vocab_parallel::kSumColumns}, acc, "row_sums");
  check(vocab_size, {}, acc, "vocab_size");
  check(scale, {}, acc, "scale");
}

}  // namespace torch_losses
