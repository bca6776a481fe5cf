// Launchers of the vocabulary-parallel cross-entropy kernels (csrc/cuda/vocab_parallel.cu;
// formulas and column layouts in csrc/losses/vocab_parallel.h). Plain pointers and a stream,
// nothing from torch; explicitly instantiated for double, float, __half, __nv_bfloat16.
#pragma once

#include "cuda/launchers.h"

namespace torch_losses {
namespace cuda {

// One rank's shard: logits (N, V) for classes [vocab_start, vocab_start + V).
template <typename T>
struct VocabParallelStatsArgs {
  const T* logits = nullptr;
  const int64_t* target_index = nullptr;  // (N) global class indices, or
  const T* target_prob = nullptr;         // (N, V) this shard's probabilities
  const acc_t<T>* weight = nullptr;       // (V) this shard's class weights, or null
  acc_t<T>* stats = nullptr;              // (N, kLocalColumns)
  int64_t N = 0, V = 0, vocab_start = 0, ignore_index = -100;
  double softcap = 0;    // 0: none
  bool smoothing = false;  // label smoothing: the class-weight sums are wanted
};

template <typename T>
struct VocabParallelGradArgs {
  const T* logits = nullptr;
  const int64_t* target_index = nullptr;
  const T* target_prob = nullptr;
  const acc_t<T>* weight = nullptr;
  const double* maxima = nullptr;        // (3, N): logits' max, target max, -target min
  const acc_t<T>* row_sums = nullptr;    // (N, kSumColumns)
  const acc_t<T>* vocab_size = nullptr;  // 0-dim: the whole vocabulary's class count
  const acc_t<T>* scale = nullptr;       // 0-dim: gradient multiplier
  acc_t<T>* loss = nullptr;              // (N) per-row loss
  T* grad_input = nullptr;               // (N, V) or null
  T* grad_target = nullptr;              // (N, V) or null (probabilities only)
  int64_t N = 0, V = 0, vocab_start = 0, ignore_index = -100;
  double label_smoothing = 0, z_loss = 0, softcap = 0;
  bool probs = false;  // probability targets (an empty shard's pointer may be null)
};

template <typename T>
void launch_vocab_parallel_stats(const VocabParallelStatsArgs<T>& a, cudaStream_t stream);
template <typename T>
void launch_vocab_parallel_grad(const VocabParallelGradArgs<T>& a, cudaStream_t stream);

}  // namespace cuda
}  // namespace torch_losses
