// C entry points of the emulator library for ctypes (tests/cuda_emu/__init__.py): each calls a
// launcher of csrc/cuda/launchers.h exactly as csrc/ops_cuda.cpp does, with the caller's
// buffers, and returns 0, or 1 with the error in tl_emu_take_error().
#include <cuda_runtime.h>

#include "cuda/ce_layout.h"
#include "cuda/launchers.h"
#include "cuda/vocab_parallel_launchers.h"

namespace tc = torch_losses::cuda;

namespace {

// dtype codes: 0 float64, 1 float32, 2 float16, 3 bfloat16.
template <typename F>
int dispatch(int dtype, const F& f) {
  switch (dtype) {
    case 0: f(double{}); break;
    case 1: f(float{}); break;
    case 2: f(__half{}); break;
    case 3: f(__nv_bfloat16{}); break;
    default: return 1;
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}

template <tc::PointwiseKind K, typename T>
void pointwise(const tc::PointwiseArgs<T>& a) {
  tc::launch_pointwise<K, T>(a, nullptr);
}

}  // namespace

extern "C" {

int64_t tl_emu_ce_scratch_size(int64_t rows, int64_t C, int per_class_weights) {
  return tc::ce_scratch_size(rows, C, per_class_weights != 0);
}

int64_t tl_emu_pointwise_num_partials(int dtype, int64_t n) {
  switch (dtype) {
    case 0: return tc::pointwise_num_partials<double>(n);
    case 1: return tc::pointwise_num_partials<float>(n);
    case 2: return tc::pointwise_num_partials<__half>(n);
    default: return tc::pointwise_num_partials<__nv_bfloat16>(n);
  }
}

// The backward-into-the-forward's-buffer flag of csrc/ops.h's *_bwd_into_ ops, for the calls
// that follow (0 or 1).
static bool g_skip_if_grad_output_is_one = false;
void tl_emu_set_skip_if_grad_output_is_one(int on) { g_skip_if_grad_output_is_one = on != 0; }

// The direction of the fast intrinsics' modelled error (tl_cuda_emu.h): +1, -1 or 0.
void tl_emu_set_fast_math_direction(int direction) { tl_emu::fast_math_direction = direction; }
// The rows_strided layout of CrossEntropyArgs for the cross-entropy calls that follow (on = 0:
// the contiguous (N, C, D)); and csrc/ops.h's rule for choosing it.
static bool g_ce_rows_strided = false;
static int64_t g_ce_strides[4] = {0, 0, 0, 0};
void tl_emu_set_ce_rows_strided(int on, int64_t x_stride_n, int64_t x_stride_d,
                                int64_t t_stride_n, int64_t t_stride_d) {
  g_ce_rows_strided = on != 0;
  g_ce_strides[0] = x_stride_n;
  g_ce_strides[1] = x_stride_d;
  g_ce_strides[2] = t_stride_n;
  g_ce_strides[3] = t_stride_d;
}
int tl_emu_ce_rows_strided(int64_t N, int64_t C, int64_t D, int64_t sN, int64_t sC, int64_t sD) {
  return tc::ce_rows_strided(N, C, D, sN, sC, sD) ? 1 : 0;
}
// The launcher's rule for the vector column kernel's 32-bit offsets.
int tl_emu_ce_column_vec_fits(int64_t C, int64_t D) {
  return tc::ce_column_vec_fits(C, D) ? 1 : 0;
}

int tl_emu_cross_entropy(int dtype, const void* input, const int64_t* target_index,
                         const void* target_prob, const void* weight, const void* grad_output,
                         int grad_output_scalar, void* loss, void* row_stats, void* grad_input,
                         void* grad_target, void* scratch, int64_t N, int64_t C, int64_t D,
                         int64_t ignore_index, double label_smoothing, int reduction,
                         double z_loss, double softcap) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = tc::acc_t<T>;
    tc::CrossEntropyArgs<T> a;
    a.input = static_cast<const T*>(input);
    a.target_index = target_index;
    a.target_prob = static_cast<const T*>(target_prob);
    a.weight = static_cast<const A*>(weight);
    a.grad_output = static_cast<const T*>(grad_output);
    a.grad_output_scalar = grad_output_scalar != 0;
    a.loss = static_cast<T*>(loss);
    a.row_stats = static_cast<A*>(row_stats);
    a.grad_input = static_cast<T*>(grad_input);
    a.grad_target = static_cast<T*>(grad_target);
    a.scratch = static_cast<A*>(scratch);
    a.N = N;
    a.C = C;
    a.D = D;
    a.ignore_index = ignore_index;
    a.label_smoothing = label_smoothing;
    a.reduction = reduction;
    a.z_loss = z_loss;
    a.softcap = softcap;
    a.skip_if_grad_output_is_one = g_skip_if_grad_output_is_one;
    a.rows_strided = g_ce_rows_strided;
    a.x_stride_n = g_ce_strides[0];
    a.x_stride_d = g_ce_strides[1];
    a.t_stride_n = g_ce_strides[2];
    a.t_stride_d = g_ce_strides[3];
    tc::launch_cross_entropy<T>(a, nullptr);
  });
}

// kind: the order of tc::PointwiseKind.
int tl_emu_pointwise(int kind, int dtype, const void* input, const void* target,
                     const void* weight, const void* aux, const void* grad_output,
                     int grad_output_scalar, void* loss, void* grad_input, void* grad_target,
                     void* partials, int64_t n, double param, int reduction) {
  if (kind < 0 || kind > int(tc::PointwiseKind::KLDivLogTarget)) return 1;
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    tc::PointwiseArgs<T> a;
    a.input = static_cast<const T*>(input);
    a.target = static_cast<const T*>(target);
    a.weight = static_cast<const T*>(weight);
    a.aux = static_cast<const T*>(aux);
    a.grad_output = static_cast<const T*>(grad_output);
    a.grad_output_scalar = grad_output_scalar != 0;
    a.loss = static_cast<T*>(loss);
    a.grad_input = static_cast<T*>(grad_input);
    a.grad_target = static_cast<T*>(grad_target);
    a.partials = static_cast<tc::acc_t<T>*>(partials);
    a.n = n;
    a.param = param;
    a.reduction = reduction;
    a.skip_if_grad_output_is_one = g_skip_if_grad_output_is_one;
    using K = tc::PointwiseKind;
    switch (K(kind)) {
      case K::BCEWithLogits: pointwise<K::BCEWithLogits>(a); break;
      case K::Huber: pointwise<K::Huber>(a); break;
      case K::SmoothL1: pointwise<K::SmoothL1>(a); break;
      case K::MSE: pointwise<K::MSE>(a); break;
      case K::L1: pointwise<K::L1>(a); break;
      case K::BCE: pointwise<K::BCE>(a); break;
      case K::Hinge: pointwise<K::Hinge>(a); break;
      case K::KLDiv: pointwise<K::KLDiv>(a); break;
      case K::KLDivLogTarget: pointwise<K::KLDivLogTarget>(a); break;
    }
  });
}

int tl_emu_scale_grad(int dtype, void* grad, const void* grad_output, int mode, int64_t numel,
                      int64_t N, int64_t C, int64_t D) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    tc::launch_scale_grad<T>(static_cast<T*>(grad), static_cast<const T*>(grad_output), mode,
                             numel, N, C, D, nullptr);
  });
}

// Vocabulary-parallel cross-entropy (csrc/cuda/vocab_parallel.cu): the two passes.
int tl_emu_vocab_parallel_stats(int dtype, const void* logits, const int64_t* target_index,
                                const void* target_prob, const void* weight, void* stats,
                                int64_t N, int64_t V, int64_t vocab_start, int64_t ignore_index,
                                double softcap, int smoothing) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = tc::acc_t<T>;
    tc::VocabParallelStatsArgs<T> a;
    a.logits = static_cast<const T*>(logits);
    a.target_index = target_index;
    a.target_prob = static_cast<const T*>(target_prob);
    a.weight = static_cast<const A*>(weight);
    a.stats = static_cast<A*>(stats);
    a.N = N;
    a.V = V;
    a.vocab_start = vocab_start;
    a.ignore_index = ignore_index;
    a.softcap = softcap;
    a.smoothing = smoothing != 0;
    tc::launch_vocab_parallel_stats<T>(a, nullptr);
  });
}

int tl_emu_vocab_parallel_grad(int dtype, const void* logits, const int64_t* target_index,
                               const void* target_prob, const void* weight,
                               const double* maxima, const void* row_sums,
                               const void* vocab_size, const void* scale, void* loss,
                               void* grad_input, void* grad_target, int64_t N, int64_t V,
                               int64_t vocab_start, int64_t ignore_index,
                               double label_smoothing, double z_loss, double softcap,
                               int probs) {
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = tc::acc_t<T>;
    tc::VocabParallelGradArgs<T> a;
    a.logits = static_cast<const T*>(logits);
    a.target_index = target_index;
    a.target_prob = static_cast<const T*>(target_prob);
    a.weight = static_cast<const A*>(weight);
    a.maxima = maxima;
    a.row_sums = static_cast<const A*>(row_sums);
    a.vocab_size = static_cast<const A*>(vocab_size);
    a.scale = static_cast<const A*>(scale);
    a.loss = static_cast<A*>(loss);
    a.grad_input = static_cast<T*>(grad_input);
    a.grad_target = static_cast<T*>(grad_target);
    a.N = N;
    a.V = V;
    a.vocab_start = vocab_start;
    a.ignore_index = ignore_index;
    a.label_smoothing = label_smoothing;
    a.z_loss = z_loss;
    a.softcap = softcap;
    a.probs = probs != 0;
    tc::launch_vocab_parallel_grad<T>(a, nullptr);
  });
}

}  // extern "C"
