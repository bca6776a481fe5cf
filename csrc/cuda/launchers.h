// The CUDA kernels' entry points: plain pointers, int64 sizes and a stream, nothing from torch.
// csrc/ops_cuda.cpp (compiled by the host compiler, with torch) allocates and dispatches; the
// csrc/cuda/*.cu files (compiled by nvcc, without torch) define and explicitly instantiate these
// launchers for T = double, float, __half, __nv_bfloat16.
//
// Every launcher only enqueues kernels on `stream`: no host synchronization, no allocation, so
// they can be captured in CUDA graphs. Scratch buffers are passed in by the caller, sized by the
// inline functions below. All reductions are deterministic: fixed-size chunks whose partial sums
// do not depend on the grid size, then a second kernel that adds them in a fixed order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace torch_losses {
namespace cuda {

// Accumulation type: double for double, float otherwise.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// ---------------------------------------------------------------------------------------------
// Deterministic sums: elements are grouped in chunks of kReduceChunk; each chunk's partial sum
// has a fixed order, and the partials are added by one block in a fixed order.
constexpr int64_t kReduceChunk = 4096;
inline int64_t reduce_num_chunks(int64_t n) { return (n + kReduceChunk - 1) / kReduceChunk; }

// ---------------------------------------------------------------------------------------------
// Pointwise losses.
enum class PointwiseKind : int {
  BCEWithLogits,
  Huber,
  SmoothL1,
  MSE,
  L1,
  BCE,
  Hinge,
  KLDiv,
  KLDivLogTarget,
};

// Elements handled by one reduction chunk of the pointwise kernel (16-byte vectors, 256
// threads, 4 vectors per thread): the partial sums depend on this only.
template <typename T>
constexpr int64_t pointwise_chunk() {
  return int64_t(256) * (16 / int64_t(sizeof(T))) * 4;
}
template <typename T>
inline int64_t pointwise_num_partials(int64_t n) {
  return (n + pointwise_chunk<T>() - 1) / pointwise_chunk<T>();
}

template <typename T>
struct PointwiseArgs {
  const T* input = nullptr;
  const T* target = nullptr;
  const T* weight = nullptr;       // element weight or nullptr (1)
  const T* aux = nullptr;          // pos_weight or nullptr (1)
  const T* grad_output = nullptr;  // backward: scalar (grad_output_scalar) or per element
  bool grad_output_scalar = false;
  // Backward into the forward's gradient buffers (*_bwd_into_ ops, issue 13): the kernel returns
  // at once when the scalar grad_output, read on the device, is exactly 1.
  bool skip_if_grad_output_is_one = false;
  T* loss = nullptr;         // forward: n elements (reduction none) or 1 (mean/sum); else null
  T* grad_input = nullptr;   // nullptr when not wanted
  T* grad_target = nullptr;  // nullptr when not wanted
  acc_t<T>* partials = nullptr;  // pointwise_num_partials<T>(n) values, for mean/sum forwards
  int64_t n = 0;
  double param = 0;
  int reduction = 1;  // 0 none, 1 mean, 2 sum
};

template <PointwiseKind K, typename T>
void launch_pointwise(const PointwiseArgs<T>& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Cross-entropy over input (N, C, D): element (n, c, d) at n*C*D + c*D + d; a "row" is (n, d).
template <typename T>
struct CrossEntropyArgs {
  const T* input = nullptr;
  const int64_t* target_index = nullptr;  // (N, D) class indices, or
  const T* target_prob = nullptr;         // (N, C, D) probabilities
  const acc_t<T>* weight = nullptr;       // (C) or nullptr
  const T* grad_output = nullptr;         // backward: scalar (grad_output_scalar) or (N, D)
  bool grad_output_scalar = false;
  bool skip_if_grad_output_is_one = false;  // as in PointwiseArgs (issue 13)
  T* loss = nullptr;                       // forward: (N, D) for none, 1 for mean/sum
  // (K, N, D), written by the forward, read by the backward (csrc/ops.h): [0] the row max m,
  // [1] log s = log sum_c exp(x_c - m), [2] (probability targets) u = sum_c w_c t'_c.
  acc_t<T>* row_stats = nullptr;
  T* grad_input = nullptr;                 // may alias input (in-place forward)
  T* grad_target = nullptr;
  // Scratch, sized by ce_scratch_size(): row losses, reduction partials and device scalars.
  acc_t<T>* scratch = nullptr;
  int64_t N = 0, C = 0, D = 0;
  // Layout. rows_strided false: input, a probability target and the gradients are the contiguous
  // (N, C, D). rows_strided: the classes of each row (n, d) are contiguous (stride 1); its input
  // starts at n x_stride_n + d x_stride_d, its probability target at n t_stride_n + d t_stride_d,
  // and the gradients are dense in (n, d, c) order (row n D + d at (n D + d) C: for D == 1 the
  // contiguous (N, C)). Rows of a slice x[:, :C] of a wider tensor, or an (N, d, C) tensor seen
  // as (N, C, d), take the row kernel this way, without a copy.
  bool rows_strided = false;
  int64_t x_stride_n = 0, x_stride_d = 0, t_stride_n = 0, t_stride_d = 0;
  int64_t ignore_index = -100;
  double label_smoothing = 0;
  int reduction = 1;
  double z_loss = 0;   // adds z_loss * lse^2 per non-ignored row (0: off)
  double softcap = 0;  // > 0: logits x -> softcap * tanh(x / softcap) first (0: off)
};

// Split rows: too few rows of many classes to fill a GPU (16 x 256000) are cut into S slices of
// >= kCeSliceMin classes, one block each: a first kernel writes each slice's (max, sum of exp,
// smoothing sums), a second merges a row's S partials in a fixed order and writes the slice's
// gradient. S depends on the shape only (not the GPU), so results are the same bits everywhere;
// 256 blocks fill the largest current GPUs twice.
constexpr int64_t kCeSliceMin = 8192;
constexpr int64_t kCeSplitMax = 16;
constexpr int64_t kCeSplitBlocks = 256;
inline int64_t ce_split_count(int64_t rows, int64_t C) {
  if (rows <= 0 || rows >= kCeSplitBlocks || C < 2 * kCeSliceMin) return 1;
  int64_t s = (kCeSplitBlocks + rows - 1) / rows;
  if (s > kCeSplitMax) s = kCeSplitMax;
  if (s > C / kCeSliceMin) s = C / kCeSliceMin;
  return s;
}
// The slices of a row on sm_90, where the S blocks of a row form a thread-block cluster that
// keeps the row in shared memory (one read from DRAM; cross_entropy_impl.cuh:
// ce_cluster_kernel): the split's S where it splits (so the two paths give the same bits), else, for rows of at least
// kCeClusterRowBytes, slices of ~kCeClusterSliceBytes. Why those: the row kernel reads a row
// twice and hopes for L2 on the second read; 132 SMs x 256 KiB rows in flight are 33 MB, beyond
// the ~60% of a 50 MB L2 that the row kernel's grid cap aims at, so from 256 KiB on its second
// read comes from DRAM (1024 x 256000 bf16: 3 passes). 64 KiB slices let three blocks share an
// SM's 228 KiB of shared memory (one loads while another writes its gradient), and keep the
// cluster at <= 8 blocks (portable) for rows up to 512 KiB (1024 x 256000 bf16: 8 slices of
// 62.5 KiB, 8192 blocks); 16 (non-portable, checked with cudaOccupancyMaxActiveClusters) above.
// Rows of 128256 bf16 classes (250.5 KiB) stay on the row kernel (prediction in
// benchmarks/NOTES.md). Rows longer than 16 slices of the device's opt-in shared memory
// (~3.5 MB) are not clustered. 1 = no cluster.
constexpr int64_t kCeClusterRowBytes = 256 << 10;
constexpr int64_t kCeClusterSliceBytes = 64 << 10;
inline int64_t ce_cluster_count(int64_t rows, int64_t C, int64_t elem_bytes) {
  const int64_t s = ce_split_count(rows, C);
  if (s > 1) return s;
  const int64_t row_bytes = C * elem_bytes;
  if (rows <= 0 || row_bytes < kCeClusterRowBytes) return 1;
  const int64_t n = (row_bytes + kCeClusterSliceBytes - 1) / kCeClusterSliceBytes;
  return n < kCeSplitMax ? n : kCeSplitMax;
}

// Per split row: S partial statistics of 4 values, and x_y (read before an in-place gradient).
inline int64_t ce_split_scratch(int64_t rows, int64_t C) {
  const int64_t s = ce_split_count(rows, C);
  return s > 1 ? rows * (4 * s + 1) : 0;
}

// Shifted copies of the class weights (cross_entropy_impl.cuh: vec_weights), in acc_t elements: up
// to 4 copies at a pitch of at most C + 8, and the room to start them at a 16-byte boundary.
inline int64_t ce_weight_copies_size(int64_t C) { return 4 * (C + 8) + 4; }

// Scratch (in acc_t elements) the cross-entropy launcher needs for N*D rows of C classes;
// per_class_weights: class weights read class by class (label smoothing or probability targets).
inline int64_t ce_scratch_size(int64_t rows, int64_t C, bool per_class_weights) {
  // [0, 4): device scalars (W, sum of class weights); then one loss per row; then the partials
  // of the two-stage sums, one after another: over rows (W, the loss) and over classes (the
  // class-weight sum); then the split rows' partials; then the weights' shifted copies.
  const int64_t partials = reduce_num_chunks(rows > C ? rows : C);
  return 4 + rows + partials + ce_split_scratch(rows, C) +
         (per_class_weights ? ce_weight_copies_size(C) : 0);
}

template <typename T>
void launch_cross_entropy(const CrossEntropyArgs<T>& args, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// grad *= grad_output in place. mode 0: grad_output is a scalar (nothing is done when it equals
// 1, read on the device); mode 1: per element; mode 2: grad is (N, C, D) and grad_output (N, D).
template <typename T>
void launch_scale_grad(T* grad, const T* grad_output, int mode, int64_t numel, int64_t N,
                       int64_t C, int64_t D, cudaStream_t stream);

}  // namespace cuda
}  // namespace torch_losses
