// Backend-independent glue of the torch_losses ops: argument checks, output allocation and the
// op registrations. A backend (csrc/cpu, csrc/cuda) supplies a struct with
//   template <template <typename> class Loss> static void pointwise(const PointwiseProblem&);
//   static void cross_entropy(const CrossEntropyProblem&);
//   static void scale_grad(at::Tensor& grad, const at::Tensor& grad_output);
// and registers everything with register_ops<Backend>(m).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "cuda/ce_layout.h"
#include "losses/math.h"
#include "losses/pointwise.h"

namespace torch_losses {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// One pointwise-loss call. Inputs are of one shape, dtype and non-overlapping, dense layout
// (pointwise_layout), outputs too; outputs that are not wanted are undefined.
struct PointwiseProblem {
  Tensor input, target;
  Tensor weight;       // element weight, or undefined
  Tensor aux;          // pos_weight (BCE-with-logits), or undefined
  Tensor grad_output;  // backward ops: 0-dim or the shape of input; forward ops: undefined
  Tensor loss;         // forward ops: input's shape for 'none', else 0-dim
  Tensor grad_input, grad_target;
  double param = 0;    // the loss' scalar (delta, beta, margin)
  int64_t reduction = kMean;
  // Backward into the forward's gradient buffers (which hold the gradient for grad_output = 1):
  // the kernel reads the scalar grad_output itself and does nothing when it is exactly 1.
  bool skip_if_grad_output_is_one = false;
};

// One cross-entropy call over input (N, C, D).
struct CrossEntropyProblem {
  Tensor input;        // (N, C, D), contiguous unless rows_strided
  Tensor target;       // (N, D) int64, or (N, C, D) probabilities of input's dtype
  Tensor weight;       // (C) in the accumulation dtype, or undefined
  Tensor grad_output;  // backward op: 0-dim, or (N, D) for 'none'; forward op: undefined
  Tensor loss;         // forward: (N, D) for 'none', else 0-dim; backward: undefined
  // (K, N, D) accumulation dtype, written by the forward, read by the backward (which then
  // reads each row once): [0] the row max m, [1] log s = log sum_c exp(x_c - m), and for
  // probability targets [2] u = sum_c w_c t'_c. lse = m + log s; the backward keeps the two
  // apart, since their rounded sum costs the softmax up to ulp(lse)/2 (5e-4 near 1e4 in float).
  Tensor row_stats;
  Tensor grad_input, grad_target;
  int64_t ignore_index = -100;
  double label_smoothing = 0;
  int64_t reduction = kMean;
  bool probability_target = false;
  bool skip_if_grad_output_is_one = false;  // as in PointwiseProblem
  // LLM-training extras (issue 9): z_loss adds z_loss * lse^2 per non-ignored row (lse of the
  // capped logits), not class-weighted, reduced like the cross-entropy; softcap > 0 replaces
  // every logit x by softcap * tanh(x / softcap) before the softmax. 0: off.
  double z_loss = 0;
  double softcap = 0;
  int64_t N = 0, C = 0, D = 0;
  // CUDA (cuda::ce_rows_strided): input kept with its strides, its classes contiguous in each
  // row; a probability target with classes contiguous too; the gradients dense in (n, d, c)
  // order (ce_grad_like). Else every tensor is the contiguous (N, C, D).
  bool rows_strided = false;
};

inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum,
                    "torch_losses: reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
                    reduction);
}

inline void check_floating(const Tensor& t, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kDouble || s == at::kFloat || s == at::kHalf || s == at::kBFloat16,
              "torch_losses: ", name, " must be float64, float32, float16 or bfloat16, got ", s);
}

// A softcap > 0 must be a normal number of the accumulation type: the kernels scale the
// logits by its reciprocal there, which overflows for a subnormal softcap (NaN at a zero
// logit), and a softcap beyond the type's largest value would be inf.
inline void check_softcap_range(double softcap, at::ScalarType input_dtype) {
  const bool dbl = accumulation_type(input_dtype) == at::kDouble;
  const double lo = dbl ? std::numeric_limits<double>::min() : std::numeric_limits<float>::min();
  const double hi = dbl ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  TORCH_CHECK_VALUE(softcap >= lo && softcap <= hi, "torch_losses: softcap must lie in [", lo,
                    ", ", hi, "] (a normal ", accumulation_type(input_dtype),
                    ", the accumulation type) for ", input_dtype, " logits, got ", softcap);
}

// The loss parameters torch's own ops reject (NaN included), with their messages.
inline void check_huber_delta(double delta) {
  TORCH_CHECK(delta > 0, "huber_loss does not support non-positive values for delta.");
}
inline void check_smooth_l1_beta(double beta) {
  TORCH_CHECK(beta >= 0, "smooth_l1_loss does not support negative values for beta.");
}

// smooth_l1's beta is 0 in the accumulation type: its kernels are l1_loss's (see smooth_l1_fwd).
inline bool smooth_l1_is_l1(double beta, const Tensor& x) {
  return accumulation_type(x.scalar_type()) == at::kDouble ? beta == 0.0
                                                          : static_cast<float>(beta) == 0.0f;
}

inline void check_like_input(const Tensor& input, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == input.device(), "torch_losses: ", name, " is on ", t.device(),
              " but input is on ", input.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "torch_losses: ", name, " has dtype ",
              t.scalar_type(), " but input has dtype ", input.scalar_type());
  TORCH_CHECK(t.sizes() == input.sizes(), "torch_losses: ", name, " has shape ", t.sizes(),
              " but input has shape ", input.sizes());
}

// A fresh large CPU output from the output cache (csrc/cpu/output_cache.cpp), else at::empty.
Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options);
// The same with strides: those of a non-overlapping, dense tensor of these sizes.
Tensor empty_cpu_output(at::IntArrayRef sizes, at::IntArrayRef strides,
                        const at::TensorOptions& options);

inline Tensor fresh_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? empty_cpu_output(sizes, options) : at::empty(sizes, options);
}

inline Tensor grad_like(const Tensor& t, bool wanted) {
  return wanted ? fresh_output(t.sizes(), t.options()) : Tensor();
}

// The pointwise kernels walk flat buffers, so any non-overlapping, dense layout serves them
// (channels_last, a transposed matrix): the input keeps its own, the other per-element tensors
// are brought into it (a copy only where theirs differs), and the outputs get it, as torch's
// elementwise losses give them. Empty or overlapping/strided inputs are made contiguous
// (torch_losses/_fake.py _pointwise_output mirrors this rule).
inline Tensor pointwise_layout(const Tensor& input) {
  return input.numel() > 0 && input.is_non_overlapping_and_dense() ? input : input.contiguous();
}

// Whether t (of layout's sizes) lies in layout's flat order: the strides agree on every
// dimension of size > 1.
inline bool same_layout(const Tensor& t, const Tensor& layout) {
  for (int64_t d = 0; d < layout.dim(); ++d) {
    if (layout.size(d) > 1 && t.stride(d) != layout.stride(d)) return false;
  }
  return true;
}

inline Tensor in_layout_of(const Tensor& t, const Tensor& layout) {
  return same_layout(t, layout) ? t : at::empty_like(layout).copy_(t);
}

// A fresh output (or gradient) in a pointwise problem's layout: a contiguous one has the
// standard strides (whatever its size-1 dimensions' strides).
inline Tensor output_like(const Tensor& layout) {
  if (layout.is_contiguous()) return fresh_output(layout.sizes(), layout.options());
  return layout.is_cpu() ? empty_cpu_output(layout.sizes(), layout.strides(), layout.options())
                         : at::empty_strided(layout.sizes(), layout.strides(), layout.options());
}

inline Tensor pointwise_grad_like(const Tensor& layout, bool wanted) {
  return wanted ? output_like(layout) : Tensor();
}

inline Tensor or_empty(const Tensor& t, const Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

inline PointwiseProblem pointwise_problem(const Tensor& input, const Tensor& target,
                                          const OptTensor& weight, const OptTensor& aux,
                                          double param, int64_t reduction) {
  check_reduction(reduction);
  check_floating(input, "input");
  check_like_input(input, target, "target");
  PointwiseProblem p;
  p.input = pointwise_layout(input);
  p.target = in_layout_of(target, p.input);
  if (weight.has_value()) {
    check_like_input(input, *weight, "weight");
    p.weight = in_layout_of(*weight, p.input);
  }
  if (aux.has_value()) {
    check_like_input(input, *aux, "pos_weight");
    p.aux = in_layout_of(*aux, p.input);
  }
  p.param = param;
  p.reduction = reduction;
  return p;
}

template <template <typename> class Loss, typename Backend>
std::tuple<Tensor, Tensor, Tensor> pointwise_fwd(const Tensor& input, const Tensor& target,
                                                 const OptTensor& weight, const OptTensor& aux,
                                                 double param, int64_t reduction,
                                                 bool input_grad, bool target_grad) {
  PointwiseProblem p = pointwise_problem(input, target, weight, aux, param, reduction);
  p.loss = reduction == kNone ? output_like(p.input) : at::empty({}, p.input.options());
  p.grad_input = pointwise_grad_like(p.input, input_grad);
  p.grad_target = pointwise_grad_like(p.input, target_grad);
  Backend::template pointwise<Loss>(p);
  return {p.loss, or_empty(p.grad_input, p.input), or_empty(p.grad_target, p.input)};
}

// grad_output of a backward op in the input's dtype: 0-dim for mean/sum; for 'none' the loss'
// shape, or 0-dim. An expanded grad_output (every stride 0, as from loss.sum()) is the scalar it
// is, never materialized.
inline Tensor backward_grad_output(const Tensor& grad_output, const Tensor& input,
                                   int64_t reduction, at::IntArrayRef loss_shape) {
  TORCH_CHECK(grad_output.device() == input.device(),
              "torch_losses: grad_output is on another device than input");
  Tensor g = grad_output;
  if (reduction == kNone && g.dim() > 0 && g.numel() > 0) {
    TORCH_CHECK(g.sizes() == loss_shape, "torch_losses: grad_output has shape ", g.sizes(),
                ", expected ", loss_shape);
    const auto strides = g.strides();
    if (std::all_of(strides.begin(), strides.end(), [](int64_t s) { return s == 0; })) {
      g = g.as_strided({}, {});
    }
  } else if (reduction == kNone) {
    TORCH_CHECK(g.dim() == 0 || g.sizes() == loss_shape, "torch_losses: grad_output has shape ",
                g.sizes(), ", expected ", loss_shape, " or a scalar");
  } else {
    TORCH_CHECK(g.dim() == 0, "torch_losses: grad_output must be a scalar");
  }
  return g.to(input.scalar_type());
}

// A gradient buffer that a *_bwd_into_ op writes: the forward's (the problem's layout), or an
// empty tensor when that gradient is not wanted.
inline Tensor forward_grad_buffer(const Tensor& buffer, const Tensor& layout, const char* name) {
  if (buffer.numel() == 0) return Tensor();
  check_like_input(layout, buffer, name);
  TORCH_CHECK(same_layout(buffer, layout), "torch_losses: ", name,
              " must have the input's layout (the forward's gradient)");
  return buffer;
}

template <template <typename> class Loss, typename Backend>
std::tuple<Tensor, Tensor> pointwise_bwd(const Tensor& grad_output, const Tensor& input,
                                         const Tensor& target, const OptTensor& weight,
                                         const OptTensor& aux, double param, int64_t reduction,
                                         bool input_grad, bool target_grad) {
  PointwiseProblem p = pointwise_problem(input, target, weight, aux, param, reduction);
  p.grad_output = backward_grad_output(grad_output, input, reduction, input.sizes());
  if (p.grad_output.dim() > 0) p.grad_output = in_layout_of(p.grad_output, p.input);
  p.grad_input = pointwise_grad_like(p.input, input_grad);
  p.grad_target = pointwise_grad_like(p.input, target_grad);
  Backend::template pointwise<Loss>(p);
  return {or_empty(p.grad_input, p.input), or_empty(p.grad_target, p.input)};
}

// The backward of a mean/sum forward that wrote the gradients for grad_output = 1: recomputes
// them into those buffers with grad_output folded in before the one rounding, unless the scalar
// grad_output is exactly 1 (read by the kernel: no host sync on CUDA).
template <template <typename> class Loss, typename Backend>
void pointwise_bwd_into(Tensor& grad_input, Tensor& grad_target, const Tensor& grad_output,
                        const Tensor& input, const Tensor& target, const OptTensor& weight,
                        const OptTensor& aux, double param, int64_t reduction) {
  TORCH_CHECK(reduction != kNone, "torch_losses: the *_bwd_into_ ops take reduction mean or sum");
  PointwiseProblem p = pointwise_problem(input, target, weight, aux, param, reduction);
  p.grad_output = backward_grad_output(grad_output, input, reduction, {}).contiguous();
  p.grad_input = forward_grad_buffer(grad_input, p.input, "grad_input");
  p.grad_target = forward_grad_buffer(grad_target, p.input, "grad_target");
  p.skip_if_grad_output_is_one = true;
  if (p.grad_input.defined() || p.grad_target.defined()) Backend::template pointwise<Loss>(p);
}

inline CrossEntropyProblem cross_entropy_problem(const Tensor& input, const Tensor& target,
                                                 const OptTensor& weight, int64_t ignore_index,
                                                 double label_smoothing, int64_t reduction,
                                                 double z_loss,
                                                 const std::optional<double>& softcap) {
  check_reduction(reduction);
  check_floating(input, "input");
  TORCH_CHECK_VALUE(z_loss >= 0.0 && std::isfinite(z_loss),
                    "torch_losses: z_loss must be a finite number >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)),
                    "torch_losses: softcap must be None or a finite number > 0, got ",
                    softcap.value_or(0.0));
  if (softcap.has_value()) check_softcap_range(*softcap, input.scalar_type());
  TORCH_CHECK(input.dim() == 3, "torch_losses: cross_entropy ops take input (N, C, D), got ",
              input.sizes());
  TORCH_CHECK(target.device() == input.device(), "torch_losses: target is on ",
              target.device(), " but input is on ", input.device());
  // torch rejects label_smoothing > 1 only; a negative or NaN one means none (below).
  TORCH_CHECK(!(label_smoothing > 1.0), "label_smoothing must be between 0.0 and 1.0. Got: ",
              label_smoothing);
  CrossEntropyProblem p;
  p.N = input.size(0);
  p.C = input.size(1);
  p.D = input.size(2);
  p.probability_target = target.dim() == 3;
  if (p.probability_target) {
    check_like_input(input, target, "target");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong,
                "torch_losses: class-index target must be int64, got ", target.scalar_type());
    TORCH_CHECK(target.dim() == 2 && target.size(0) == p.N && target.size(1) == p.D,
                "torch_losses: target has shape ", target.sizes(), ", expected (", p.N, ", ",
                p.D, ")");
  }
  TORCH_CHECK(p.C > 0 || p.N * p.D == 0, "torch_losses: cross_entropy needs at least one class");
  p.rows_strided = input.is_cuda() &&
                   cuda::ce_rows_strided(p.N, p.C, p.D, input.stride(0), input.stride(1),
                                         input.stride(2));
  if (p.rows_strided) {
    p.input = input;
    // A probability target keeps its strides where its classes are contiguous too; else it is
    // copied in (n, d, c) order.
    if (!p.probability_target) p.target = target.contiguous();
    else if (target.stride(1) == 1) p.target = target;
    else p.target = target.transpose(1, 2).contiguous().transpose(1, 2);
  } else {
    p.input = input.contiguous();
    p.target = target.contiguous();
  }
  if (weight.has_value()) {
    TORCH_CHECK(weight->device() == input.device(), "torch_losses: weight is on ",
                weight->device(), " but input is on ", input.device());
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == p.C,
                "weight tensor should be defined either for all ", p.C,
                " classes or no classes but got weight tensor of shape: ", weight->sizes());
    p.weight = weight->to(accumulation_type(input.scalar_type())).contiguous();
  }
  p.ignore_index = ignore_index;
  p.label_smoothing = label_smoothing > 0 ? label_smoothing : 0.0;  // torch: <= 0 means none
  p.reduction = reduction;
  p.z_loss = z_loss;
  p.softcap = softcap.value_or(0.0);
  return p;
}

// A cross-entropy gradient buffer: the contiguous (N, C, D), or for rows_strided the dense
// (n, d, c) order the kernels write.
inline Tensor ce_grad_like(const CrossEntropyProblem& p, bool wanted) {
  if (!wanted) return Tensor();
  if (!p.rows_strided || p.D == 1) return fresh_output({p.N, p.C, p.D}, p.input.options());
  return at::empty({p.N, p.D, p.C}, p.input.options()).transpose(1, 2);
}

// forward_grad_buffer for cross-entropy: the layout ce_grad_like gives.
inline Tensor ce_grad_buffer(const Tensor& buffer, const CrossEntropyProblem& p,
                             const char* name) {
  if (buffer.numel() == 0) return Tensor();
  check_like_input(p.input, buffer, name);
  TORCH_CHECK(p.rows_strided ? buffer.transpose(1, 2).is_contiguous() : buffer.is_contiguous(),
              "torch_losses: ", name, " must be in the layout of the forward's gradient");
  return buffer;
}

// K of the (K, N, D) row statistics: m and log s, and u for probability targets.
inline int64_t row_stats_count(bool probability_target) { return probability_target ? 3 : 2; }

inline Tensor new_row_stats(const CrossEntropyProblem& p) {
  return at::empty({row_stats_count(p.probability_target), p.N, p.D},
                   p.input.options().dtype(accumulation_type(p.input.scalar_type())));
}

inline void check_saved_row_stats(const CrossEntropyProblem& p, const Tensor& row_stats) {
  TORCH_CHECK(row_stats.device() == p.input.device() &&
                  row_stats.scalar_type() == accumulation_type(p.input.scalar_type()) &&
                  row_stats.sizes() ==
                      at::IntArrayRef({row_stats_count(p.probability_target), p.N, p.D}),
              "torch_losses: row_stats must be the forward's (",
              row_stats_count(p.probability_target), ", N, D) row statistics, got ",
              row_stats.sizes());
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor> cross_entropy_fwd(
    const Tensor& input, const Tensor& target, const OptTensor& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction, bool input_grad, bool target_grad, double z_loss,
    const std::optional<double>& softcap) {
  CrossEntropyProblem p = cross_entropy_problem(input, target, weight, ignore_index,
                                                label_smoothing, reduction, z_loss, softcap);
  TORCH_CHECK(!target_grad || p.probability_target,
              "torch_losses: class-index targets have no gradient");
  auto opts = p.input.options();
  p.loss = reduction == kNone ? at::empty({p.N, p.D}, opts) : at::empty({}, opts);
  p.row_stats = new_row_stats(p);
  p.grad_input = ce_grad_like(p, input_grad);
  if (target_grad) p.grad_target = ce_grad_like(p, true);
  Backend::cross_entropy(p);
  return {p.loss, p.row_stats, or_empty(p.grad_input, p.input),
          or_empty(p.grad_target, p.input)};
}

template <typename Backend>
std::tuple<Tensor, Tensor> cross_entropy_fwd_inplace(Tensor& input, const Tensor& target,
                                                     const OptTensor& weight,
                                                     int64_t ignore_index,
                                                     double label_smoothing,
                                                     int64_t reduction, double z_loss,
                                                     const std::optional<double>& softcap) {
  TORCH_CHECK(input.is_contiguous(), "torch_losses: inplace_backward needs contiguous logits");
  CrossEntropyProblem p = cross_entropy_problem(input, target, weight, ignore_index,
                                                label_smoothing, reduction, z_loss, softcap);
  TORCH_CHECK(!p.probability_target,
              "torch_losses: inplace_backward supports class-index targets only");
  auto opts = p.input.options();
  p.loss = reduction == kNone ? at::empty({p.N, p.D}, opts) : at::empty({}, opts);
  p.row_stats = new_row_stats(p);
  p.grad_input = input;  // the kernels read each row before writing its gradient
  Backend::cross_entropy(p);
  return {p.loss, p.row_stats};
}

template <typename Backend>
std::tuple<Tensor, Tensor> cross_entropy_bwd(const Tensor& grad_output, const Tensor& input,
                                             const Tensor& target, const OptTensor& weight,
                                             const Tensor& row_stats, int64_t ignore_index,
                                             double label_smoothing, int64_t reduction,
                                             bool input_grad, bool target_grad, double z_loss,
                                             const std::optional<double>& softcap) {
  CrossEntropyProblem p = cross_entropy_problem(input, target, weight, ignore_index,
                                                label_smoothing, reduction, z_loss, softcap);
  TORCH_CHECK(!target_grad || p.probability_target,
              "torch_losses: class-index targets have no gradient");
  check_saved_row_stats(p, row_stats);
  p.grad_output = backward_grad_output(grad_output, input, reduction, {p.N, p.D}).contiguous();
  p.row_stats = row_stats.contiguous();
  p.grad_input = ce_grad_like(p, input_grad);
  if (target_grad) p.grad_target = ce_grad_like(p, true);
  Backend::cross_entropy(p);
  return {or_empty(p.grad_input, p.input), or_empty(p.grad_target, p.input)};
}

// As pointwise_bwd_into, for cross-entropy with reduction mean or sum.
template <typename Backend>
void cross_entropy_bwd_into(Tensor& grad_input, Tensor& grad_target, const Tensor& grad_output,
                            const Tensor& input, const Tensor& target, const OptTensor& weight,
                            const Tensor& row_stats, int64_t ignore_index,
                            double label_smoothing,
                            int64_t reduction, double z_loss,
                            const std::optional<double>& softcap) {
  TORCH_CHECK(reduction != kNone,
              "torch_losses: cross_entropy_bwd_into_ takes reduction mean or sum");
  CrossEntropyProblem p = cross_entropy_problem(input, target, weight, ignore_index,
                                                label_smoothing, reduction, z_loss, softcap);
  check_saved_row_stats(p, row_stats);
  p.grad_output = backward_grad_output(grad_output, input, reduction, {}).contiguous();
  p.row_stats = row_stats.contiguous();
  p.grad_input = ce_grad_buffer(grad_input, p, "grad_input");
  if (p.probability_target) p.grad_target = ce_grad_buffer(grad_target, p, "grad_target");
  TORCH_CHECK(p.probability_target || grad_target.numel() == 0,
              "torch_losses: class-index targets have no gradient");
  p.skip_if_grad_output_is_one = true;
  if (p.grad_input.defined() || p.grad_target.defined()) Backend::cross_entropy(p);
}

template <typename Backend>
void scale_grad_(Tensor& grad, const Tensor& grad_output) {
  TORCH_CHECK(grad_output.device() == grad.device(),
              "torch_losses: grad_output is on another device than the gradient");
  TORCH_CHECK(grad.is_contiguous(), "torch_losses: scale_grad_ needs a contiguous gradient");
  bool per_element = grad_output.sizes() == grad.sizes();
  bool per_position = grad.dim() >= 2 && grad_output.dim() == grad.dim() - 1 &&
                      grad_output.size(0) == grad.size(0) &&
                      grad_output.sizes().slice(1) == grad.sizes().slice(2);
  TORCH_CHECK(grad_output.dim() == 0 || per_element || per_position,
              "torch_losses: grad_output of shape ", grad_output.sizes(),
              " does not match a gradient of shape ", grad.sizes());
  Backend::scale_grad(grad, grad_output.to(grad.scalar_type()).contiguous());
}

// The schemas' argument lists, mapped onto the generic ops above.
template <typename Backend>
void register_ops(torch::Library& m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd<Backend>);
  m.impl("cross_entropy_fwd_inplace", &cross_entropy_fwd_inplace<Backend>);
  m.impl("cross_entropy_bwd", &cross_entropy_bwd<Backend>);
  m.impl("cross_entropy_bwd_into_", &cross_entropy_bwd_into<Backend>);
  m.impl("scale_grad_", &scale_grad_<Backend>);

  m.impl("bce_with_logits_fwd", [](const Tensor& x, const Tensor& y, const OptTensor& w,
                                   const OptTensor& pw, int64_t r, bool gx, bool gy) {
    return pointwise_fwd<BCEWithLogits, Backend>(x, y, w, pw, pw.has_value(), r, gx, gy);
  });
  m.impl("bce_with_logits_bwd", [](const Tensor& g, const Tensor& x, const Tensor& y,
                                   const OptTensor& w, const OptTensor& pw, int64_t r, bool gx,
                                   bool gy) {
    return pointwise_bwd<BCEWithLogits, Backend>(g, x, y, w, pw, pw.has_value(), r, gx, gy);
  });
  m.impl("huber_fwd", [](const Tensor& x, const Tensor& y, const OptTensor& w, double delta,
                         int64_t r, bool gx, bool gy) {
    check_huber_delta(delta);
    return pointwise_fwd<Huber, Backend>(x, y, w, std::nullopt, delta, r, gx, gy);
  });
  m.impl("huber_bwd", [](const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w,
                         double delta, int64_t r, bool gx, bool gy) {
    check_huber_delta(delta);
    return pointwise_bwd<Huber, Backend>(g, x, y, w, std::nullopt, delta, r, gx, gy);
  });
  m.impl("mse_fwd", [](const Tensor& x, const Tensor& y, const OptTensor& w, int64_t r, bool gx,
                       bool gy) {
    return pointwise_fwd<MSE, Backend>(x, y, w, std::nullopt, 0, r, gx, gy);
  });
  m.impl("mse_bwd", [](const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w,
                       int64_t r, bool gx, bool gy) {
    return pointwise_bwd<MSE, Backend>(g, x, y, w, std::nullopt, 0, r, gx, gy);
  });
  m.impl("l1_fwd", [](const Tensor& x, const Tensor& y, const OptTensor& w, int64_t r, bool gx,
                      bool gy) {
    return pointwise_fwd<L1, Backend>(x, y, w, std::nullopt, 0, r, gx, gy);
  });
  m.impl("l1_bwd", [](const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w,
                      int64_t r, bool gx, bool gy) {
    return pointwise_bwd<L1, Backend>(g, x, y, w, std::nullopt, 0, r, gx, gy);
  });
  // smooth_l1 with beta = 0 is l1_loss, bit for bit (as torch routes it): the L1 kernels, so
  // that SmoothL1's kernels carry no beta = 0 case per element. So is a beta that is 0 in the
  // accumulation type (below float's least subnormal for float32 and 16-bit input), where
  // SmoothL1's z / beta would be 0 / 0 at z = 0 (torch's float kernel gives 0 there in its
  // scalar loop, -1 in its vector loop).
  m.impl("smooth_l1_fwd", [](const Tensor& x, const Tensor& y, double beta, int64_t r, bool gx,
                             bool gy) {
    check_smooth_l1_beta(beta);
    return smooth_l1_is_l1(beta, x)
               ? pointwise_fwd<L1, Backend>(x, y, std::nullopt, std::nullopt, 0, r, gx, gy)
               : pointwise_fwd<SmoothL1, Backend>(x, y, std::nullopt, std::nullopt, beta, r, gx,
                                                  gy);
  });
  m.impl("smooth_l1_bwd", [](const Tensor& g, const Tensor& x, const Tensor& y, double beta,
                             int64_t r, bool gx, bool gy) {
    check_smooth_l1_beta(beta);
    return smooth_l1_is_l1(beta, x)
               ? pointwise_bwd<L1, Backend>(g, x, y, std::nullopt, std::nullopt, 0, r, gx, gy)
               : pointwise_bwd<SmoothL1, Backend>(g, x, y, std::nullopt, std::nullopt, beta, r,
                                                  gx, gy);
  });
  m.impl("bce_fwd", [](const Tensor& x, const Tensor& y, const OptTensor& w, int64_t r, bool gx,
                       bool gy) {
    return pointwise_fwd<BCE, Backend>(x, y, w, std::nullopt, 0, r, gx, gy);
  });
  m.impl("bce_bwd", [](const Tensor& g, const Tensor& x, const Tensor& y, const OptTensor& w,
                       int64_t r, bool gx, bool gy) {
    return pointwise_bwd<BCE, Backend>(g, x, y, w, std::nullopt, 0, r, gx, gy);
  });
  m.impl("hinge_fwd", [](const Tensor& x, const Tensor& y, double margin, int64_t r, bool gx,
                         bool gy) {
    return pointwise_fwd<Hinge, Backend>(x, y, std::nullopt, std::nullopt, margin, r, gx, gy);
  });
  m.impl("hinge_bwd", [](const Tensor& g, const Tensor& x, const Tensor& y, double margin,
                         int64_t r, bool gx, bool gy) {
    return pointwise_bwd<Hinge, Backend>(g, x, y, std::nullopt, std::nullopt, margin, r, gx, gy);
  });
  m.impl("kl_div_fwd", [](const Tensor& x, const Tensor& y, bool log_target, int64_t r, bool gx,
                          bool gy) {
    return log_target
               ? pointwise_fwd<KLDivLogTarget, Backend>(x, y, std::nullopt, std::nullopt, 0, r,
                                                        gx, gy)
               : pointwise_fwd<KLDiv, Backend>(x, y, std::nullopt, std::nullopt, 0, r, gx, gy);
  });
  m.impl("kl_div_bwd", [](const Tensor& g, const Tensor& x, const Tensor& y, bool log_target,
                          int64_t r, bool gx, bool gy) {
    return log_target
               ? pointwise_bwd<KLDivLogTarget, Backend>(g, x, y, std::nullopt, std::nullopt, 0,
                                                        r, gx, gy)
               : pointwise_bwd<KLDiv, Backend>(g, x, y, std::nullopt, std::nullopt, 0, r, gx,
                                               gy);
  });

  // The *_bwd_into_ ops: the backward of a mean/sum forward that wrote the gradients.
  m.impl("bce_with_logits_bwd_into_", [](Tensor& gx, Tensor& gy, const Tensor& g,
                                         const Tensor& x, const Tensor& y, const OptTensor& w,
                                         const OptTensor& pw, int64_t r) {
    pointwise_bwd_into<BCEWithLogits, Backend>(gx, gy, g, x, y, w, pw, pw.has_value(), r);
  });
  m.impl("huber_bwd_into_", [](Tensor& gx, Tensor& gy, const Tensor& g, const Tensor& x,
                                  const Tensor& y, const OptTensor& w, double delta, int64_t r) {
    check_huber_delta(delta);
    pointwise_bwd_into<Huber, Backend>(gx, gy, g, x, y, w, std::nullopt, delta, r);
  });
  m.impl("mse_bwd_into_", [](Tensor& gx, Tensor& gy, const Tensor& g, const Tensor& x,
                                  const Tensor& y, const OptTensor& w, int64_t r) {
    pointwise_bwd_into<MSE, Backend>(gx, gy, g, x, y, w, std::nullopt, 0, r);
  });
  m.impl("l1_bwd_into_", [](Tensor& gx, Tensor& gy, const Tensor& g, const Tensor& x,
                                  const Tensor& y, const OptTensor& w, int64_t r) {
    pointwise_bwd_into<L1, Backend>(gx, gy, g, x, y, w, std::nullopt, 0, r);
  });
  m.impl("smooth_l1_bwd_into_", [](Tensor& gx, Tensor& gy, const Tensor& g, const Tensor& x,
                                  const Tensor& y, double beta, int64_t r) {
    check_smooth_l1_beta(beta);
    if (smooth_l1_is_l1(beta, x)) {
      pointwise_bwd_into<L1, Backend>(gx, gy, g, x, y, std::nullopt, std::nullopt, 0, r);
    } else {
      pointwise_bwd_into<SmoothL1, Backend>(gx, gy, g, x, y, std::nullopt, std::nullopt, beta,
                                            r);
    }
  });
  m.impl("bce_bwd_into_", [](Tensor& gx, Tensor& gy, const Tensor& g, const Tensor& x,
                                  const Tensor& y, const OptTensor& w, int64_t r) {
    pointwise_bwd_into<BCE, Backend>(gx, gy, g, x, y, w, std::nullopt, 0, r);
  });
  m.impl("hinge_bwd_into_", [](Tensor& gx, Tensor& gy, const Tensor& g, const Tensor& x,
                                  const Tensor& y, double margin, int64_t r) {
    pointwise_bwd_into<Hinge, Backend>(gx, gy, g, x, y, std::nullopt, std::nullopt, margin, r);
  });
  m.impl("kl_div_bwd_into_", [](Tensor& gx, Tensor& gy, const Tensor& g, const Tensor& x,
                                 const Tensor& y, bool log_target, int64_t r) {
    if (log_target) {
      pointwise_bwd_into<KLDivLogTarget, Backend>(gx, gy, g, x, y, std::nullopt, std::nullopt,
                                                  0, r);
    } else {
      pointwise_bwd_into<KLDiv, Backend>(gx, gy, g, x, y, std::nullopt, std::nullopt, 0, r);
    }
  });
}

}  // namespace torch_losses
