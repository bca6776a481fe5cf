// Every schema of the torch_losses ops, in one place. Kernels register per backend in
// csrc/cpu and csrc/*_cuda.cpp; fake (meta) kernels live in torch_losses/_fake.py.
//
// Conventions shared by the ops:
// - reduction is torch's enum: 0 none, 1 mean, 2 sum.
// - Pointwise *_fwd ops take input and target of one shape (the Python layer broadcasts) and
//   optional weights already expanded to that shape. They return (loss, grad_input,
//   grad_target): the gradients of the loss for grad_output = 1, written in the same pass when
//   input_grad / target_grad ask for them, else empty tensors.
// - *_bwd ops compute the gradients from the inputs and grad_output without a saved buffer.
//   grad_output is 0-dim for mean/sum; for 'none' the loss' shape, or 0-dim (an expanded
//   grad_output, every stride 0, is read as that scalar).
// - *_bwd_into_ ops recompute into the buffers a mean/sum forward wrote, for backward with a
//   scalar grad_output other than 1 (see below).
// - scale_grad_ multiplies a gradient written by a forward by grad_output, in place; it returns
//   at once when grad_output is the scalar 1.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An importable module, so that `import torch_losses._C` loads the library and runs the
// registrations below. No Python functions: every entry point is a torch op.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torch_losses, m) {
  // Cross-entropy over input (N, C, D): class dim 1, D the folded trailing dims. target is (N, D)
  // int64 class indices or (N, C, D) probabilities. Returns (loss, row_stats, grad_input,
  // grad_target); row_stats (K, N, D), float32 (float64 for float64 input), holds per position
  // [0] the max m of the (capped) logits, [1] log s = log sum_c exp(x_c - m) and, for
  // probability targets (K = 3), [2] u = sum_c w_c t'_c (t' the smoothed target). The
  // log-sum-exp is m + log s; the *_bwd ops take row_stats and read each row once.
  // The last two arguments of every cross_entropy op (defaults: off): z_loss adds
  // z_loss * lse^2 per non-ignored position to the loss (not class-weighted; 'mean' divides it
  // by the cross-entropy's denominator); softcap > 0 replaces every logit x by
  // softcap * tanh(x / softcap) before the softmax (loss, lse and gradients).
  m.def("cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
        "float label_smoothing, int reduction, bool input_grad, bool target_grad, "
        "float z_loss=0., float? softcap=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("cross_entropy_bwd(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "Tensor row_stats, int ignore_index, float label_smoothing, int reduction, "
        "bool input_grad, bool target_grad, float z_loss=0., float? softcap=None) "
        "-> (Tensor, Tensor)");
  // The same forward, writing the input gradient over the input (class-index targets only).
  // Returns (loss, row_stats).
  m.def("cross_entropy_fwd_inplace(Tensor(a!) input, Tensor target, Tensor? weight, "
        "int ignore_index, float label_smoothing, int reduction, float z_loss=0., "
        "float? softcap=None) -> (Tensor, Tensor)");

  m.def("bce_with_logits_fwd(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
        "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("bce_with_logits_bwd(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "Tensor? pos_weight, int reduction, bool input_grad, bool target_grad) "
        "-> (Tensor, Tensor)");
  m.def("huber_fwd(Tensor input, Tensor target, Tensor? weight, float delta, int reduction, "
        "bool input_grad, bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("huber_bwd(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "float delta, int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  m.def("mse_fwd(Tensor input, Tensor target, Tensor? weight, int reduction, bool input_grad, "
        "bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("mse_bwd(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  m.def("l1_fwd(Tensor input, Tensor target, Tensor? weight, int reduction, bool input_grad, "
        "bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("l1_bwd(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  m.def("smooth_l1_fwd(Tensor input, Tensor target, float beta, int reduction, bool input_grad, "
        "bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("smooth_l1_bwd(Tensor grad_output, Tensor input, Tensor target, float beta, "
        "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  m.def("bce_fwd(Tensor input, Tensor target, Tensor? weight, int reduction, bool input_grad, "
        "bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("bce_bwd(Tensor grad_output, Tensor input, Tensor target, Tensor? weight, "
        "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  m.def("hinge_fwd(Tensor input, Tensor target, float margin, int reduction, bool input_grad, "
        "bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("hinge_bwd(Tensor grad_output, Tensor input, Tensor target, float margin, "
        "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");
  m.def("kl_div_fwd(Tensor input, Tensor target, bool log_target, int reduction, "
        "bool input_grad, bool target_grad) -> (Tensor, Tensor, Tensor)");
  m.def("kl_div_bwd(Tensor grad_output, Tensor input, Tensor target, bool log_target, "
        "int reduction, bool input_grad, bool target_grad) -> (Tensor, Tensor)");

  // The backward of a mean/sum forward that wrote the gradients (for grad_output = 1) into
  // grad_input / grad_target (an empty tensor: not wanted): recomputed in place with the scalar
  // grad_output folded in before the one rounding; nothing is done when grad_output is exactly
  // 1 (read by the kernel, no host sync).
  m.def("bce_with_logits_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, "
        "Tensor grad_output, Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
        "int reduction) -> ()");
  m.def("huber_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, Tensor grad_output, "
        "Tensor input, Tensor target, Tensor? weight, float delta, int reduction) -> ()");
  m.def("mse_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, Tensor grad_output, "
        "Tensor input, Tensor target, Tensor? weight, int reduction) -> ()");
  m.def("l1_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, Tensor grad_output, "
        "Tensor input, Tensor target, Tensor? weight, int reduction) -> ()");
  m.def("smooth_l1_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, Tensor grad_output, "
        "Tensor input, Tensor target, float beta, int reduction) -> ()");
  m.def("bce_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, Tensor grad_output, "
        "Tensor input, Tensor target, Tensor? weight, int reduction) -> ()");
  m.def("hinge_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, Tensor grad_output, "
        "Tensor input, Tensor target, float margin, int reduction) -> ()");
  m.def("kl_div_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, Tensor grad_output, "
        "Tensor input, Tensor target, bool log_target, int reduction) -> ()");
  m.def("cross_entropy_bwd_into_(Tensor(a!) grad_input, Tensor(b!) grad_target, "
        "Tensor grad_output, Tensor input, Tensor target, Tensor? weight, Tensor row_stats, "
        "int ignore_index, float label_smoothing, int reduction, float z_loss=0., "
        "float? softcap=None) -> ()");

  // grad *= grad_output, in place. grad_output is a scalar, the shape of grad, or the shape of
  // grad without its dim 1 (per-position cross-entropy 'none').
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");

  // The CPU output cache (csrc/cpu/output_cache.cpp): hand its blocks back to the system, or
  // read how many bytes it holds.
  m.def("empty_cpu_cache() -> int");
  m.def("cpu_cache_bytes() -> int");
}

// Vocabulary-parallel cross-entropy (torch_losses/distributed.py; formulas and column layouts in
// csrc/losses/vocab_parallel.h). logits (N, V_local) are one rank's classes
// [vocab_start, vocab_start + V_local); target is (N) int64 (global class indices) or this
// shard's (N, V_local) probabilities; weight is this shard's (V_local) class weights in the
// accumulation dtype (float32, float64 for float64 logits), as are all statistics; softcap 0 is
// off, else a normal number of that dtype.
TORCH_LIBRARY_FRAGMENT(torch_losses, m) {
  // Per-row statistics of the shard, relative to its own max: (N, 9).
  m.def("vocab_parallel_ce_stats(Tensor logits, Tensor target, Tensor? weight, int vocab_start, "
        "int ignore_index, float label_smoothing, float softcap) -> Tensor");
  // From the all-reduced statistics (maxima (3, N) float64: the row max of the logits, the max
  // of the target and of minus the target over the ranks (0 for probabilities); row_sums
  // (N, 8); vocab_size: the total number of classes, 0-dim): the per-row loss (N) and, when
  // asked, the shard's gradients times scale (0-dim: 1/denominator for 'mean', else 1).
  // Raises on every rank where a target lies in no shard or the ranks' targets differ.
  m.def("vocab_parallel_ce_grad(Tensor logits, Tensor target, Tensor? weight, Tensor maxima, "
        "Tensor row_sums, Tensor vocab_size, Tensor scale, int vocab_start, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap, bool input_grad, bool target_grad) "
        "-> (Tensor, Tensor, Tensor)");
}
