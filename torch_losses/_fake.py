"""Fake (meta) kernels of the torch_losses ops: output shapes, dtypes and strides (those the
real ops give: inductor checks them), so that torch.compile, torch.export and FakeTensor tracing
see through the ops without running them."""
import torch
from torch.library import register_fake

_NONE = 0
_POINTWISE = ("bce_with_logits", "huber", "mse", "l1", "smooth_l1", "bce", "hinge", "kl_div")


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_or_empty(like, wanted):
    """A gradient is a fresh contiguous tensor of like's shape (csrc/ops.h grad_like), whatever
    like's strides."""
    return like.new_empty(like.shape) if wanted else like.new_empty((0,))


def _non_overlapping_and_dense(t):
    """c10's is_non_overlapping_and_dense: the dimensions of size > 1, ordered by stride, are
    contiguous."""
    expected = 1
    for size, stride in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n != 1),
                               key=lambda size_stride: size_stride[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _pointwise_output(input):
    """A pointwise op's 'none' loss or gradient (csrc/ops.h pointwise_layout, output_like): the
    strides of a non-contiguous, non-overlapping and dense, non-empty input; else contiguous."""
    if (not input.is_contiguous() and input.numel() > 0
            and _non_overlapping_and_dense(input)):
        return input.new_empty_strided(input.shape, input.stride())
    return input.new_empty(input.shape)


def _pointwise_grad_or_empty(input, wanted):
    return _pointwise_output(input) if wanted else input.new_empty((0,))


def _ce_rows_strided(input):
    """csrc/cuda/ce_layout.h ce_rows_strided: CUDA logits (N, C, D) read with their strides."""
    n, c, d = input.shape
    s_n, s_c, _ = input.stride()
    contiguous = d == 1 and (n <= 1 or s_n == c)
    return input.device.type == "cuda" and c >= 2 and s_c == 1 and not contiguous


def _ce_grad_or_empty(input, wanted):
    """A cross-entropy gradient (csrc/ops.h ce_grad_like): the contiguous (N, C, D), or for
    CUDA rows read with their strides and D > 1, a dense (N, D, C) seen as (N, C, D)."""
    if not wanted:
        return input.new_empty((0,))
    n, c, d = input.shape
    if d > 1 and _ce_rows_strided(input):
        return input.new_empty((n, d, c)).transpose(1, 2)
    return input.new_empty((n, c, d))


def _pointwise_fwd_fake(input, target, *args):
    *_, reduction, input_grad, target_grad = args
    torch._check(input.shape == target.shape, lambda: "input and target shapes differ")
    loss = _pointwise_output(input) if reduction == _NONE else input.new_empty(())
    return (loss, _pointwise_grad_or_empty(input, input_grad),
            _pointwise_grad_or_empty(input, target_grad))


def _pointwise_bwd_fake(grad_output, input, target, *args):
    *_, reduction, input_grad, target_grad = args
    return (_pointwise_grad_or_empty(input, input_grad),
            _pointwise_grad_or_empty(input, target_grad))


def _bwd_into_fake(grad_input, grad_target, grad_output, *args):
    return None  # writes the forward's buffers in place


for _name in _POINTWISE:
    register_fake(f"torch_losses::{_name}_fwd")(_pointwise_fwd_fake)
    register_fake(f"torch_losses::{_name}_bwd")(_pointwise_bwd_fake)
    register_fake(f"torch_losses::{_name}_bwd_into_")(_bwd_into_fake)
register_fake("torch_losses::cross_entropy_bwd_into_")(_bwd_into_fake)


def row_stats_count(probability_target):
    """K of the cross_entropy ops' (K, N, D) row statistics: the max m and log s, and the
    target sum u for probability targets (csrc/ops.h)."""
    return 3 if probability_target else 2


def _ce_outputs(input, target, reduction):
    n, _, d = input.shape
    loss = input.new_empty((n, d)) if reduction == _NONE else input.new_empty(())
    row_stats = input.new_empty((row_stats_count(target.dim() == 3), n, d),
                                dtype=_acc_dtype(input.dtype))
    return loss, row_stats


@register_fake("torch_losses::cross_entropy_fwd")
def _cross_entropy_fwd_fake(input, target, weight, ignore_index, label_smoothing, reduction,
                            input_grad, target_grad, z_loss=0.0, softcap=None):
    torch._check(input.dim() == 3, lambda: "cross_entropy ops take input (N, C, D)")
    loss, row_stats = _ce_outputs(input, target, reduction)
    return (loss, row_stats, _ce_grad_or_empty(input, input_grad),
            _ce_grad_or_empty(input, target_grad))


@register_fake("torch_losses::cross_entropy_fwd_inplace")
def _cross_entropy_fwd_inplace_fake(input, target, weight, ignore_index, label_smoothing,
                                    reduction, z_loss=0.0, softcap=None):
    return _ce_outputs(input, target, reduction)


@register_fake("torch_losses::cross_entropy_bwd")
def _cross_entropy_bwd_fake(grad_output, input, target, weight, row_stats, ignore_index,
                            label_smoothing, reduction, input_grad, target_grad, z_loss=0.0,
                            softcap=None):
    return _ce_grad_or_empty(input, input_grad), _ce_grad_or_empty(input, target_grad)


@register_fake("torch_losses::scale_grad_")
def _scale_grad_fake(grad, grad_output):
    return None


# Vocabulary-parallel cross-entropy (csrc/losses/vocab_parallel.h: 9 local columns, 8 summed).
@register_fake("torch_losses::vocab_parallel_ce_stats")
def _vocab_parallel_ce_stats_fake(logits, target, weight, vocab_start, ignore_index,
                                  label_smoothing, softcap):
    torch._check(logits.dim() == 2, lambda: "vocab-parallel ops take logits (N, V_local)")
    return logits.new_empty((logits.shape[0], 9), dtype=_acc_dtype(logits.dtype))


@register_fake("torch_losses::vocab_parallel_ce_grad")
def _vocab_parallel_ce_grad_fake(logits, target, weight, maxima, row_sums, vocab_size, scale,
                                 vocab_start, ignore_index, label_smoothing, z_loss, softcap,
                                 input_grad, target_grad):
    torch._check(logits.dim() == 2, lambda: "vocab-parallel ops take logits (N, V_local)")
    loss = logits.new_empty((logits.shape[0],), dtype=_acc_dtype(logits.dtype))
    return loss, _grad_or_empty(logits, input_grad), _grad_or_empty(logits, target_grad)
