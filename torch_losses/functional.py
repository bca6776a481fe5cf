"""Functional losses with torch.nn.functional's signatures and semantics.

Argument checks, legacy size_average/reduce, dtype promotion and broadcasting happen here, as
in torch; the loss itself runs in the fused torch_losses ops through the autograd Functions.

Following the installed torch (not a version's behaviour):
- invalid arguments raise what torch raises: where a check here fails, torch's own function is
  called on the same arguments first and its exception (type and message) propagates; unusual
  dtypes (integer, bool, complex) are probed on one-element tensors;
- under autocast, inputs are cast to the dtype torch's loss computes in there (probed once per
  dtype combination), so the result and its dtype are torch's.
"""
import math
import warnings

import torch
import torch._dynamo
import torch.nn.functional as TF
from torch.nn import _reduction as _Reduction

from . import distributed as _distributed

from ._autograd import (
    BCEFunction,
    BCEWithLogitsFunction,
    CrossEntropyFunction,
    CrossEntropyLseFunction,
    HingeFunction,
    HuberFunction,
    KLDivFunction,
    L1Function,
    MSEFunction,
    SmoothL1Function,
    _reduce,
    apply_function,
    cross_entropy_composite,
    loss_of,
    lse_of,
    reduction_enum,
)

__all__ = [
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "huber_loss",
    "mse_loss",
    "l1_loss",
    "smooth_l1_loss",
    "binary_cross_entropy",
    "kl_div",
    "hinge_loss",
    "linear_cross_entropy",
]


def _resolve_reduction(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)  # warns, as torch
    reduction_enum(reduction)  # ValueError naming an invalid value
    return reduction


def _detach_without_grad_mode(*tensors):
    """Under no_grad an autograd.Function still reports needs_input_grad for inputs that
    require grad, and would write gradients nobody asked for (or, with inplace_backward,
    overwrite the input). Detached inputs make the forward compute the loss only."""
    if torch.is_grad_enabled():
        return tensors
    return tuple(None if t is None else t.detach() for t in tensors)


def _check_same_device(*tensors):
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise RuntimeError(
            "Expected all tensors to be on the same device, but found at least two devices, "
            + " and ".join(sorted(str(d) for d in devices)))


def _fail_like_torch(torch_call, error):
    """An argument check failed: raise what torch raises for the same call (its exception type
    and message follow the installed torch), or `error` where torch accepts the call."""
    if torch.compiler.is_compiling():
        torch_call()  # under torch.compile it fails the way torch's loss fails there
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_call()
    raise error


def _check_dtypes_like_torch(torch_loss, *tensors):
    """Integer, bool or complex inputs: raise what torch's loss raises for these dtypes, probed
    on one-element tensors (cheap, and exact for dtype errors)."""
    if all(t.is_floating_point() for t in tensors):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_loss(*(t.new_zeros((1,)) for t in tensors))


# torch's ScalarType names, as its messages spell them.
_DTYPE_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half",
                torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int",
                torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                torch.bool: "Bool", torch.complex64: "ComplexFloat",
                torch.complex128: "ComplexDouble"}

# torch.promote_types of every pair of the dtypes a loss can meet, looked up rather than called:
# torch.export records a call in its graph (a node returning a dtype, which torch.compile of the
# exported module cannot trace).
_PROMOTED = {(a, b): torch.promote_types(a, b)
             for a in _DTYPE_NAMES for b in _DTYPE_NAMES}


def _promote_types(a, b):
    promoted = _PROMOTED.get((a, b))
    return torch.promote_types(a, b) if promoted is None else promoted


def _promote(input, target, torch_loss):
    dtype = _promote_types(input.dtype, target.dtype)
    if not dtype.is_floating_point:
        error = NotImplementedError(
            f"torch_losses: floating point input and target expected, got {input.dtype} and "
            f"{target.dtype}")
        if torch_loss is None:
            raise error
        _fail_like_torch(lambda: _check_dtypes_like_torch(torch_loss, input, target), error)
    if input.dtype != dtype:
        input = input.to(dtype)
    if target.dtype != dtype:
        target = target.to(dtype)
    return input, target



def _dtype_name(dtype):
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


_AUTOCAST_RESULT_DTYPE = {}


def _autocast_dtype(torch_loss, input, target):
    """Under autocast: the dtype torch's loss computes in and returns for inputs of these dtypes
    (e.g. float32 for bfloat16 logits), probed once per combination on one-element tensors.
    None when autocast is off for input's device."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    key = (torch_loss, device_type, torch.get_autocast_dtype(device_type), input.dtype,
           target.dtype, target.shape == input.shape)
    if key not in _AUTOCAST_RESULT_DTYPE:
        x = torch.full((1, 2), 0.5, dtype=input.dtype, device=input.device)
        if target.is_floating_point():
            y = torch.full((1, 2), 0.5, dtype=target.dtype, device=input.device)
        else:
            y = torch.zeros((1,), dtype=target.dtype, device=input.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _AUTOCAST_RESULT_DTYPE[key] = torch_loss(x, y).dtype
    return _AUTOCAST_RESULT_DTYPE[key]


def _follow_autocast(torch_loss, input, target, *others):
    """Casts the floating inputs as torch's loss gets them under autocast (no-op outside)."""
    dtype = _autocast_dtype(torch_loss, input, target)
    if dtype is None:
        return (input, target, *others)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype
                 else t for t in (input, target, *others))


# Under torch.compile(fullgraph=True) dynamo runs this while tracing (it cannot trace
# warnings.warn itself): the warning comes once per compilation, as torch's losses' warnings do.
@torch._dynamo.assume_constant_result
def _warn(message, stacklevel):
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)
    return True


def _broadcast(input, target, torch_loss):
    if target.size() != input.size():
        _warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to "
            "broadcasting. Please ensure they have the same size.", 3)
    _check_dtypes_like_torch(torch_loss, input, target)
    input, target = _promote(input, target, torch_loss)
    return torch.broadcast_tensors(input, target)


def _check_not_differentiable(tensor, fn, argument):
    if tensor is not None and tensor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"The function '{fn}' is not differentiable with respect to argument "
                           f"'{argument}'. This input cannot have requires_grad True.")


def check_llm_extras(z_loss, softcap, return_lse):
    """The keyword-only extras of the cross-entropy losses: z_loss a finite number >= 0,
    softcap None or a finite number > 0, return_lse a bool. Returns (z_loss, softcap) as
    floats."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"z_loss must be a float, got {type(z_loss).__name__}")
    if not 0 <= z_loss < math.inf:  # (comparisons, not math.isfinite: dynamo traces them)
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be None or a float, got {type(softcap).__name__}")
        if not 0 < softcap < math.inf:
            raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
        softcap = float(softcap)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return float(z_loss), softcap


def _row_shape(input):
    """The shape of the per-position loss (reduction 'none') of logits `input`."""
    return input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, inplace_backward=False, z_loss=0.0,
                  softcap=None, return_lse=False):
    """torch.nn.functional.cross_entropy, fused. inplace_backward=True (class-index targets)
    writes the gradient over `input` during the forward for zero extra memory: `input` is
    destroyed, its version counter is bumped so that any other user of it raises in backward,
    and the graph can be backpropagated once.

    LLM-training extras (keyword-only, off by default):
    - softcap (None or a float > 0): every logit x becomes softcap * tanh(x / softcap) inside
      the kernel, before the softmax (loss, lse and gradient). A normal number of the
      accumulation type (float32 for 16- and 32-bit input, else float64), else ValueError.
    - z_loss (float >= 0): adds z_loss * lse^2 for every position whose target is not
      ignore_index (every position for probability targets), lse = logsumexp of the (capped)
      logits. Not multiplied by the class weights. 'none' adds it to each position's loss,
      'sum' to the sum, and 'mean' divides the sum of both terms by the cross-entropy's own
      denominator (the summed class weights of the non-ignored targets; the number of
      positions for probability targets).
    - return_lse=True returns (loss, lse): lse the per-position logsumexp of the (capped)
      logits from the same pass, detached, float32 (float64 for float64 input), shaped like
      the 'none' loss (ignored positions included)."""
    z_loss, softcap = check_llm_extras(z_loss, softcap, return_lse)
    reduction = _resolve_reduction(size_average, reduce, reduction)
    if _distributed._is_dtensor(input):  # sharded on the class dimension: vocab-parallel kernels
        if return_lse:
            raise NotImplementedError("torch_losses: return_lse=True is not supported for a "
                                      "DTensor input")
        return _distributed.dtensor_cross_entropy(input, target, weight, ignore_index,
                                                  reduction, label_smoothing, z_loss, softcap)
    _check_same_device(input, target, weight)

    def torch_call():
        return TF.cross_entropy(input, target, weight, ignore_index=ignore_index,
                                reduction=reduction, label_smoothing=label_smoothing)

    if not input.is_floating_point() or input.dim() == 0:
        _fail_like_torch(torch_call, NotImplementedError(
            f"cross_entropy: floating point input of at least one dimension expected, got "
            f"{input.dtype} of shape {list(input.shape)}"))
    input, target, weight = _follow_autocast(TF.cross_entropy, input, target, weight)
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if num_classes == 0:
        # No class: nothing to fuse. torch's own call gives its result (nan, 0) or its error
        # (a target that is not ignored is out of bounds).
        if z_loss != 0 or softcap is not None:
            loss = cross_entropy_composite(input, target, weight, ignore_index,
                                           label_smoothing, reduction, z_loss, softcap)
        else:
            loss = torch_call()
        if return_lse:
            lse = input.new_full(_row_shape(input), -math.inf,
                                 dtype=torch.float64 if input.dtype == torch.float64
                                 else torch.float32)
            return loss, lse
        return loss
    probs = input.shape == target.shape
    if probs:
        if not target.is_floating_point() or ignore_index >= 0:
            _fail_like_torch(torch_call, RuntimeError(
                "cross_entropy: class-probability targets must be floating point, without "
                "ignore_index"))
        if inplace_backward:
            raise ValueError("inplace_backward supports class-index targets only")
        input, target = _promote(input, target, TF.cross_entropy)
    else:
        if input.dim() == 1 and target.shape == (1,) and not target.is_floating_point():
            target = target.reshape(())  # torch takes one class index in a 1-element tensor
        if target.dtype == torch.uint8:
            target = target.long()
        expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
        if target.dtype != torch.long or target.shape != expected:
            _fail_like_torch(torch_call, RuntimeError(
                f"cross_entropy: expected a Long or Byte target of shape {list(expected)}, got "
                f"{_dtype_name(target.dtype)} of shape {list(target.shape)}"))
    if label_smoothing > 1.0:
        _fail_like_torch(torch_call, RuntimeError(
            f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"))
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != num_classes or weight.dtype != input.dtype:
            _fail_like_torch(torch_call, RuntimeError(
                f"cross_entropy: weight must be a {_dtype_name(input.dtype)} tensor of "
                f"{num_classes} elements, got {_dtype_name(weight.dtype)} of shape "
                f"{list(weight.shape)}"))
        if weight.requires_grad and torch.is_grad_enabled():
            if not probs:
                _fail_like_torch(torch_call, RuntimeError(
                    "cross_entropy: not differentiable with respect to weight"))
            return _cross_entropy_differentiable_weight(input, target, weight, reduction,
                                                        label_smoothing, z_loss, softcap,
                                                        return_lse)
    if inplace_backward and input.requires_grad and torch.is_grad_enabled():
        if input.is_leaf:
            raise RuntimeError("inplace_backward=True would overwrite a leaf tensor that requires "
                               "grad; use it on logits computed by the model")
        if not input.is_contiguous():
            raise RuntimeError("inplace_backward=True needs contiguous logits")
    input, target = _detach_without_grad_mode(input, target)
    function = CrossEntropyLseFunction if return_lse else CrossEntropyFunction
    outputs = apply_function(function, input, target, weight, ignore_index,
                             float(label_smoothing), reduction, bool(inplace_backward), z_loss,
                             softcap)
    if return_lse:
        return outputs[0], lse_of(outputs[1]).detach().reshape(_row_shape(input))
    return loss_of(outputs)


def _cross_entropy_differentiable_weight(input, target, weight, reduction, label_smoothing,
                                         z_loss, softcap, return_lse):
    """Probability targets with a weight that requires grad (torch differentiates it there):
    the weighted loss is the unweighted one with target (smoothed target) * weight, so weight's
    gradient flows through that product and the fused op's target gradient."""
    num_classes = weight.shape[0]
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / num_classes
    class_shape = (num_classes,) + (1,) * (input.dim() - 2) if input.dim() > 1 else (-1,)
    return cross_entropy(input, target * weight.reshape(class_shape), reduction=reduction,
                         z_loss=z_loss, softcap=softcap, return_lse=return_lse)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """torch.nn.functional.binary_cross_entropy_with_logits, fused."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    if target.size() != input.size():
        _fail_like_torch(lambda: TF.binary_cross_entropy_with_logits(input, target), ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"))
    _check_same_device(input, target, weight, pos_weight)
    _check_not_differentiable(weight, "binary_cross_entropy_with_logits", "weight")
    _check_not_differentiable(pos_weight, "binary_cross_entropy_with_logits", "pos_weight")
    _check_dtypes_like_torch(TF.binary_cross_entropy_with_logits, input, target)
    input, target, weight, pos_weight = _follow_autocast(
        TF.binary_cross_entropy_with_logits, input, target, weight, pos_weight)
    result_dtype = target.dtype  # torch's result takes the target's dtype
    input, target = _promote(input, target, TF.binary_cross_entropy_with_logits)
    if weight is not None:
        weight = weight.to(input.dtype).expand(input.shape)
    if pos_weight is not None:
        pos_weight = pos_weight.to(input.dtype).expand(input.shape)
    input, target = _detach_without_grad_mode(input, target)
    loss = loss_of(apply_function(BCEWithLogitsFunction, input, target, weight, pos_weight,
                                  reduction))
    return loss if loss.dtype == result_dtype else loss.to(result_dtype)


def _elementwise_weighted(function, torch_loss, input, target, weight, scalars, reduction,
                          mean_by_weight):
    """torch's optional elementwise weight= of mse/l1/huber. 'mean' divides by sum(weight)
    (mse, l1) or by the number of elements (huber), as torch. A weight that requires grad
    takes torch's composite route (our elementwise loss times weight) to get its gradient. The
    result takes the promoted dtype of the loss and weight, as torch's loss * weight."""
    if weight.size() != input.size():
        _fail_like_torch(lambda: torch_loss(input, target, weight=weight),
                         ValueError("Weights and input must have the same size."))
    x, y = _broadcast(input, target, torch_loss)
    dtype = _promote_types(x.dtype, weight.dtype)
    if weight.requires_grad and torch.is_grad_enabled():
        x, y = _detach_without_grad_mode(x, y)
        loss = loss_of(apply_function(function, x, y, None, *scalars, "none")) * weight
        if reduction == "mean" and mean_by_weight:
            return loss.sum() / weight.sum()
        return _reduce(loss, reduction)
    x, y = _detach_without_grad_mode(x.to(dtype), y.to(dtype))
    w = weight.to(dtype).expand(x.shape)
    if reduction == "mean" and mean_by_weight:
        return loss_of(apply_function(function, x, y, w, *scalars, "sum")) / weight.sum()
    return loss_of(apply_function(function, x, y, w, *scalars, reduction))


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """torch.nn.functional.huber_loss, fused (weight= included)."""
    if not delta > 0:  # (NaN too, as torch)
        _fail_like_torch(lambda: TF.huber_loss(input, target, delta=delta), RuntimeError(
            "huber_loss does not support non-positive values for delta."))
    reduction_enum(reduction)
    _check_same_device(input, target, weight)
    _check_dtypes_like_torch(TF.huber_loss, input, target)
    input, target, weight = _follow_autocast(TF.huber_loss, input, target, weight)
    target = target.to(input.dtype)  # torch's result takes the input's dtype
    if weight is not None:
        return _elementwise_weighted(HuberFunction, TF.huber_loss, input, target, weight,
                                     (float(delta),), reduction, mean_by_weight=False)
    x, y = _detach_without_grad_mode(*_broadcast(input, target, TF.huber_loss))
    return loss_of(apply_function(HuberFunction, x, y, None, float(delta), reduction))


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """torch.nn.functional.mse_loss, fused: (x - y)^2 with no 1/2 factor, as torch."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    _check_same_device(input, target, weight)
    input, target, weight = _follow_autocast(TF.mse_loss, input, target, weight)
    if weight is not None:
        return _elementwise_weighted(MSEFunction, TF.mse_loss, input, target, weight, (),
                                     reduction, mean_by_weight=True)
    x, y = _detach_without_grad_mode(*_broadcast(input, target, TF.mse_loss))
    return loss_of(apply_function(MSEFunction, x, y, None, reduction))


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """torch.nn.functional.l1_loss, fused."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    _check_same_device(input, target, weight)
    input, target, weight = _follow_autocast(TF.l1_loss, input, target, weight)
    if weight is not None:
        return _elementwise_weighted(L1Function, TF.l1_loss, input, target, weight, (),
                                     reduction, mean_by_weight=True)
    x, y = _detach_without_grad_mode(*_broadcast(input, target, TF.l1_loss))
    return loss_of(apply_function(L1Function, x, y, None, reduction))


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """torch.nn.functional.smooth_l1_loss, fused (beta = 0 is l1)."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    if not beta >= 0:  # (NaN too, as torch)
        _fail_like_torch(lambda: TF.smooth_l1_loss(input, target, beta=beta), RuntimeError(
            "smooth_l1_loss does not support negative values for beta."))
    _check_same_device(input, target)
    input, target = _follow_autocast(TF.smooth_l1_loss, input, target)
    x, y = _detach_without_grad_mode(*_broadcast(input, target, TF.smooth_l1_loss))
    return loss_of(apply_function(SmoothL1Function, x, y, float(beta), reduction))


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """torch.nn.functional.binary_cross_entropy on probabilities, fused. Inputs or targets
    outside [0, 1] raise (on CUDA: a device-side assert)."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    if target.size() != input.size():
        _fail_like_torch(lambda: TF.binary_cross_entropy(input, target), ValueError(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}) is deprecated. Please ensure they have the same size."))
    _check_same_device(input, target, weight)
    _check_not_differentiable(weight, "binary_cross_entropy", "weight")
    input, target, weight = _follow_autocast(TF.binary_cross_entropy, input, target, weight)
    if target.dtype != input.dtype or not input.is_floating_point():
        _fail_like_torch(
            lambda: TF.binary_cross_entropy(input, target, weight, reduction=reduction),
            RuntimeError(f"binary_cross_entropy: Found dtype {_dtype_name(target.dtype)} but "
                         f"expected {_dtype_name(input.dtype)}"))
    if weight is not None:
        weight = weight.to(input.dtype).expand(input.shape)
    input, target = _detach_without_grad_mode(input, target)
    return loss_of(apply_function(BCEFunction, input, target, weight, reduction))


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """torch.nn.functional.kl_div (input: log-probabilities), fused; 'batchmean' divides the
    sum by input.size(0) (also when the legacy size_average/reduce pick the reduction, as
    torch)."""
    if not (input.is_floating_point() and target.is_floating_point()):
        _fail_like_torch(lambda: _check_dtypes_like_torch(TF.kl_div, input, target),
                         RuntimeError("kl_div: floating point input and target expected"))
    if size_average is not None or reduce is not None:
        kernel_reduction = _Reduction.legacy_get_string(size_average, reduce)
    else:
        if reduction == "mean":
            _warn(
                "reduction: 'mean' divides the total loss by both the batch size and the "
                "support size.'batchmean' divides only by the batch size, and aligns with the KL "
                "div math definition.'mean' will be changed to behave the same as 'batchmean' in "
                "the next major release.", 2)
        kernel_reduction = "sum" if reduction == "batchmean" else reduction
    reduction_enum(kernel_reduction)
    _check_same_device(input, target)
    input, target = _follow_autocast(TF.kl_div, input, target)
    x, y = _detach_without_grad_mode(
        *torch.broadcast_tensors(*_promote(input, target, TF.kl_div)))
    loss = loss_of(apply_function(KLDivFunction, x, y, bool(log_target), kernel_reduction))
    if reduction == "batchmean" and input.dim() != 0:
        return loss / input.size(0)
    return loss


def hinge_loss(input, target, margin=1.0, reduction="mean"):
    """Binary SVM hinge loss max(0, margin - y * x) for raw scores x and labels y in {-1, +1}
    (torch has no module for it). At the kink the gradient -y is passed, as torch's
    clamp_min(0) did up to torch 2.13."""
    reduction_enum(reduction)
    if target.size() != input.size():
        raise ValueError(f"hinge_loss: target size ({target.size()}) must be the same as input "
                         f"size ({input.size()})")
    _check_same_device(input, target)
    input, target = _promote(input, target, None)
    input, target = _detach_without_grad_mode(input, target)
    return loss_of(apply_function(HingeFunction, input, target, float(margin), reduction))


from .linear import linear_cross_entropy  # noqa: E402  (linear.py imports this module)
