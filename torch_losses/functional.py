"""Functional losses with torch.nn.functional's signatures and semantics.

Argument checks, legacy size_average/reduce, dtype promotion and broadcasting happen here, as
in torch; the loss itself runs in the fused torch_losses ops through the autograd Functions.
"""
import warnings

import torch
from torch.nn import _reduction as _Reduction

from ._autograd import (
    BCEFunction,
    BCEWithLogitsFunction,
    CrossEntropyFunction,
    HingeFunction,
    HuberFunction,
    KLDivFunction,
    L1Function,
    MSEFunction,
    SmoothL1Function,
    _reduce,
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


def _promote(input, target, name):
    dtype = torch.promote_types(input.dtype, target.dtype)
    if not dtype.is_floating_point:
        raise RuntimeError(f"{name}: expected floating point input and target, got "
                           f"{input.dtype} and {target.dtype}")
    if input.dtype != dtype:
        input = input.to(dtype)
    if target.dtype != dtype:
        target = target.to(dtype)
    return input, target


def _check_no_integral(name, *tensors):
    if any(not t.is_floating_point() for t in tensors):
        raise RuntimeError(f"{name}: Integral inputs not supported.")


def _check_no_bool(name, *tensors):
    if any(t.dtype == torch.bool for t in tensors):
        raise RuntimeError(f"{name}: boolean tensors are not supported (torch cannot subtract "
                           "them either)")


def _warn_size_mismatch(input, target):
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to "
            "broadcasting. Please ensure they have the same size.",
            stacklevel=3,
        )


def _broadcast(input, target, name):
    _warn_size_mismatch(input, target)
    input, target = _promote(input, target, name)
    return torch.broadcast_tensors(input, target)


def _check_not_differentiable(tensor, fn, argument):
    if tensor is not None and tensor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"The function '{fn}' is not differentiable with respect to argument "
                           f"'{argument}'. This input cannot have requires_grad True.")


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, inplace_backward=False):
    """torch.nn.functional.cross_entropy, fused. inplace_backward=True (class-index targets)
    writes the gradient over `input` during the forward for zero extra memory: `input` is
    destroyed, its version counter is bumped so that any other user of it raises in backward,
    and the graph can be backpropagated once."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    _check_same_device(input, target, weight)
    if not input.is_floating_point():
        raise NotImplementedError(
            f"cross_entropy: expected floating point input, got {input.dtype}")
    if input.dim() == 0:
        raise RuntimeError("cross_entropy: input must have at least one dimension (the classes)")
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if input.shape == target.shape:
        if not target.is_floating_point():
            raise RuntimeError("Expected floating point type for target with class probabilities, "
                               f"got {str(target.dtype).replace('torch.', '').title()}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        if inplace_backward:
            raise ValueError("inplace_backward supports class-index targets only")
        input, target = _promote(input, target, "cross_entropy")
    else:
        if target.dtype == torch.uint8:
            target = target.long()
        if target.dtype != torch.long:
            raise RuntimeError("expected target dtype to be Long or Byte, but got "
                               f"{str(target.dtype).replace('torch.', '').title()}")
        expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
        if input.dim() > 1 and (target.dim() == 0 or target.shape[0] != input.shape[0]):
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target "
                             f"batch_size ({target.shape[0] if target.dim() else 0}).")
        if target.shape != expected:
            raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != num_classes:
            raise RuntimeError(
                f"weight tensor should be defined either for all {num_classes} classes or no "
                f"classes but got weight tensor of shape: {list(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "torch_losses.cross_entropy does not differentiate with respect to weight; "
                "pass weight.detach()")
    if inplace_backward and input.requires_grad and torch.is_grad_enabled():
        if input.is_leaf:
            raise RuntimeError("inplace_backward=True would overwrite a leaf tensor that requires "
                               "grad; use it on logits computed by the model")
        if not input.is_contiguous():
            raise RuntimeError("inplace_backward=True needs contiguous logits")
    input, target = _detach_without_grad_mode(input, target)
    return CrossEntropyFunction.apply(input, target, weight, ignore_index, float(label_smoothing),
                                      reduction, bool(inplace_backward))


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """torch.nn.functional.binary_cross_entropy_with_logits, fused."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size "
                         f"({input.size()})")
    _check_same_device(input, target, weight, pos_weight)
    _check_not_differentiable(weight, "binary_cross_entropy_with_logits", "weight")
    _check_not_differentiable(pos_weight, "binary_cross_entropy_with_logits", "pos_weight")
    if not input.is_floating_point():
        raise NotImplementedError("binary_cross_entropy_with_logits: input must be floating "
                                  f"point, got {input.dtype}")
    if not target.is_floating_point():
        raise RuntimeError("binary_cross_entropy_with_logits: target must be floating point, "
                           f"got {target.dtype}")
    result_dtype = target.dtype  # torch's result takes the target's dtype
    input, target = _promote(input, target, "binary_cross_entropy_with_logits")
    if weight is not None:
        weight = weight.to(input.dtype).expand(input.shape)
    if pos_weight is not None:
        pos_weight = pos_weight.to(input.dtype).expand(input.shape)
    input, target = _detach_without_grad_mode(input, target)
    loss = BCEWithLogitsFunction.apply(input, target, weight, pos_weight, reduction)
    return loss if loss.dtype == result_dtype else loss.to(result_dtype)


def _elementwise_weighted(function, input, target, weight, scalars, reduction, mean_by_weight):
    """torch's optional elementwise weight= of mse/l1/huber. 'mean' divides by sum(weight)
    (mse, l1) or by the number of elements (huber), as torch. A weight that requires grad
    takes torch's composite route (our elementwise loss times weight) to get its gradient."""
    if weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")
    x, y = _detach_without_grad_mode(*_broadcast(input, target, function.__name__))
    if weight.requires_grad and torch.is_grad_enabled():
        loss = function.apply(x, y, None, *scalars, "none") * weight
        if reduction == "mean" and mean_by_weight:
            return loss.sum() / weight.sum()
        return _reduce(loss, reduction)
    w = weight.to(x.dtype).expand(x.shape)
    if reduction == "mean" and mean_by_weight:
        return function.apply(x, y, w, *scalars, "sum") / weight.sum()
    return function.apply(x, y, w, *scalars, reduction)


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """torch.nn.functional.huber_loss, fused (weight= included)."""
    if delta <= 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    reduction_enum(reduction)
    _check_same_device(input, target, weight)
    if not input.is_floating_point():
        raise RuntimeError(f"huber_loss: expected floating point input, got {input.dtype}")
    target = target.to(input.dtype)  # torch's result takes the input's dtype
    if weight is not None:
        return _elementwise_weighted(HuberFunction, input, target, weight, (float(delta),),
                                     reduction, mean_by_weight=False)
    x, y = _detach_without_grad_mode(*_broadcast(input, target, "huber_loss"))
    return HuberFunction.apply(x, y, None, float(delta), reduction)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """torch.nn.functional.mse_loss, fused: (x - y)^2 with no 1/2 factor, as torch."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    _check_same_device(input, target, weight)
    if weight is not None:
        return _elementwise_weighted(MSEFunction, input, target, weight, (), reduction,
                                     mean_by_weight=True)
    x, y = _detach_without_grad_mode(*_broadcast(input, target, "mse_loss"))
    return MSEFunction.apply(x, y, None, reduction)


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """torch.nn.functional.l1_loss, fused."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    _check_same_device(input, target, weight)
    _check_no_bool("l1_loss", input, target)
    if weight is not None:
        return _elementwise_weighted(L1Function, input, target, weight, (), reduction,
                                     mean_by_weight=True)
    x, y = _detach_without_grad_mode(*_broadcast(input, target, "l1_loss"))
    return L1Function.apply(x, y, None, reduction)


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """torch.nn.functional.smooth_l1_loss, fused (beta = 0 is l1)."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    if beta < 0:
        raise RuntimeError("smooth_l1_loss does not support negative values for beta.")
    _check_same_device(input, target)
    x, y = _detach_without_grad_mode(*_broadcast(input, target, "smooth_l1_loss"))
    return SmoothL1Function.apply(x, y, float(beta), reduction)


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """torch.nn.functional.binary_cross_entropy on probabilities, fused. Inputs or targets
    outside [0, 1] raise (on CUDA: a device-side assert)."""
    reduction = _resolve_reduction(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(f"Using a target size ({target.size()}) that is different to the input "
                         f"size ({input.size()}) is deprecated. Please ensure they have the same "
                         "size.")
    _check_same_device(input, target, weight)
    _check_not_differentiable(weight, "binary_cross_entropy", "weight")
    if target.dtype != input.dtype or not input.is_floating_point():
        raise RuntimeError(f"binary_cross_entropy: Found dtype {target.dtype} but expected "
                           f"{input.dtype} (input and target must share a floating dtype)")
    if weight is not None:
        weight = weight.to(input.dtype).expand(input.shape)
    input, target = _detach_without_grad_mode(input, target)
    return BCEFunction.apply(input, target, weight, reduction)


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """torch.nn.functional.kl_div (input: log-probabilities), fused; 'batchmean' divides the
    sum by input.size(0)."""
    _check_no_integral("kl_div", input, target)
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    elif reduction == "mean":
        warnings.warn(
            "reduction: 'mean' divides the total loss by both the batch size and the support "
            "size.'batchmean' divides only by the batch size, and aligns with the KL div math "
            "definition.'mean' will be changed to behave the same as 'batchmean' in the next "
            "major release.",
            stacklevel=2,
        )
    if reduction == "batchmean":
        _check_same_device(input, target)
        x, y = _detach_without_grad_mode(
            *torch.broadcast_tensors(*_promote(input, target, "kl_div")))
        loss = KLDivFunction.apply(x, y, bool(log_target), "sum")
        return loss / input.size(0) if input.dim() != 0 else loss
    reduction_enum(reduction)
    _check_same_device(input, target)
    x, y = _detach_without_grad_mode(*torch.broadcast_tensors(*_promote(input, target, "kl_div")))
    return KLDivFunction.apply(x, y, bool(log_target), reduction)


def hinge_loss(input, target, margin=1.0, reduction="mean"):
    """Binary SVM hinge loss max(0, margin - y * x) for raw scores x and labels y in {-1, +1}
    (torch has no module for it). At the kink the gradient -y is passed, as torch's
    clamp_min(0) does."""
    reduction_enum(reduction)
    if target.size() != input.size():
        raise ValueError(f"hinge_loss: target size ({target.size()}) must be the same as input "
                         f"size ({input.size()})")
    _check_same_device(input, target)
    input, target = _promote(input, target, "hinge_loss")
    input, target = _detach_without_grad_mode(input, target)
    return HingeFunction.apply(input, target, float(margin), reduction)


from .linear import linear_cross_entropy  # noqa: E402  (linear.py imports this module)
