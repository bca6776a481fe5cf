"""torch.autograd.Function classes: thin shells that move tensors between the forward and
backward ops. The decisions (which gradients the forward writes, how backward finishes them)
live in the module-level helpers below.

The fast path (reduction mean or sum, whose grad_output is a scalar): the forward op writes the
gradients for grad_output = 1 in the same pass that computes the loss. backward() hands that
buffer back untouched when grad_output is exactly 1 (decided by the kernel, no host sync);
otherwise it recomputes into it with grad_output folded in before the one rounding (the
*_bwd_into_ ops). It drops its own reference so that autograd can adopt the buffer as `.grad`
without a copy. (cross_entropy's inplace_backward has no logits left: it scales.)

reduction='none': the forward writes no gradient; backward is one fused *_bwd pass reading
grad_output per element (an expanded grad_output is read as the scalar it is).

A second backward through a retained graph recomputes the gradients with the *_bwd ops. Double
backward (create_graph=True) differentiates a composite of torch ops instead (each Function's
`composite`, through torch.func.vjp), and so does forward-mode AD (the jvp of each
Function's subclass in WITH_JVP); those are the only places torch's own loss implementations
are used.

torch.func: every Function has a forward without ctx, setup_context and generate_vmap_rule;
the ops have vmap rules (_vmap.py). The forward writes the gradients of the inputs that require
grad (under torch.func transforms it sees unwrapped tensors that do not, so backward recomputes)
and returns them after the loss as non-differentiable outputs for setup_context; apply() returns
the loss alone.

torch.export keeps ops, not Functions. While it traces, the functionals run the Functions'
forward alone (apply_function), which calls differentiable twins of the forward ops
(`<op>_differentiable`, bottom of this file): the same kernels, with the Function's
setup_context and backward registered as the op's autograd formula, so that an exported program
trains. Eager and torch.compile calls keep the Functions and the plain ops, whose dispatch has
no Python in it.
"""
import contextvars
import math

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch._functorch.pyfunctorch import JvpInterpreter, retrieve_all_functorch_interpreters

from . import _C  # noqa: F401  (loads the library: registers the ops)
from . import _fake  # noqa: F401  (registers their fake kernels)
from . import _vmap  # noqa: F401  (registers their vmap rules)

ops = torch.ops.torch_losses

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
REDUCTION_NAMES = {value: name for name, value in REDUCTIONS.items()}


def reduction_enum(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return REDUCTIONS[reduction]


def _reduce(loss, reduction):
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def _weighted(loss, weight):
    return loss if weight is None else loss * weight


def _none_if_empty(grad, wanted):
    return grad if wanted else None


def _forward_writes_grads(reduction):
    """Whether the forward op writes the gradients (for grad_output = 1) in its own pass: only
    for mean/sum, whose grad_output is a scalar. For 'none' a per-element grad_output comes,
    and one fused backward pass reading it costs less than scaling a saved buffer, and rounds
    once."""
    return reduction != "none"


def _empty_if_none(grad, like):
    return like.new_empty((0,)) if grad is None else grad


def _finish_forward_grads(forward_grads, grad_output, recompute_into):
    """The gradients for the scalar grad_output, from the forward's (None where not wanted),
    in the same buffers: nothing to do when grad_output is exactly 1 (read by the kernel, no
    host sync); otherwise recomputed into them with grad_output folded in before the one
    rounding. Scaling the rounded gradient would round twice (in float32 up to 1.6 ulps off,
    where torch is within 1), and a half gradient can overflow before it is scaled."""
    grad = next(g for g in forward_grads if g is not None)
    recompute_into(*(_empty_if_none(g, grad) for g in forward_grads))
    return forward_grads


def _wants_grad(*tensors):
    """Which gradients a forward writes: those of the inputs that require grad. (In a forward
    without ctx this stands for ctx.needs_input_grad; under no_grad the functionals pass detached
    inputs, under torch.func transforms the forward sees tensors that do not require grad.)"""
    return tuple(t is not None and t.requires_grad for t in tensors)


def _written_grads(ctx, grads, wanted, other_outputs=()):
    """setup_context: the gradients the forward wrote (None when it wrote none). Their outputs
    (and the forward's other_outputs but the loss) are non-differentiable, and autograd must not
    fill input-sized zero gradients for them before calling backward (a whole extra pass):
    backward reads only the loss's gradient."""
    ctx.mark_non_differentiable(*other_outputs, *grads)  # one call: each replaces the last
    ctx.set_materialize_grads(False)
    if not any(wanted):
        return None
    return tuple(_none_if_empty(g, w) for g, w in zip(grads, wanted))


def loss_of(output):
    """The loss from a Function's apply: torch.compile traces Function.apply itself rather than
    LossFunction.apply, and so returns forward's whole tuple."""
    return output[0] if isinstance(output, tuple) else output


_APPLYING = contextvars.ContextVar("torch_losses_applying", default=False)


class LossFunction(Function):
    """Base of the Functions: forward returns (loss, *what backward needs), apply the loss.

    torch.func calls apply() again from inside the outer call (one level down); those inner
    calls must return forward's tuple, so only the outermost call picks the loss."""

    generate_vmap_rule = True
    # False in a subclass whose apply returns forward's whole tuple (as torch.compile's does).
    returns_loss_only = True

    @classmethod
    def apply(cls, *args, **kwargs):
        if _APPLYING.get():
            return super().apply(*args, **kwargs)
        pick = loss_of if cls.returns_loss_only else tuple
        if torch.compiler.is_exporting():
            return pick(cls.forward(*args, **kwargs))  # see apply_function
        if cls in WITH_JVP and _forward_mode_ad_active():
            return WITH_JVP[cls].apply(*args, **kwargs)
        if (not kwargs and len(args) == cls.forward.__code__.co_argcount
                and not torch._C._are_functorch_transforms_active()):
            # Every argument given: skip Function.apply's per-call signature binding (tens of
            # microseconds) and go to the C++ apply, which is what it calls outside torch.func.
            return pick(super(Function, cls).apply(*args))
        token = _APPLYING.set(True)
        try:
            return pick(super().apply(*args, **kwargs))
        finally:
            _APPLYING.reset(token)


def apply_function(function, *args):
    """function.apply(*args), or while torch.export traces, function.forward(*args) alone: an
    exported program keeps ops, not Functions (strict export, through dynamo, even runs the
    Function's forward without grad), and the forward then calls the ops' differentiable twins.
    Under forward-mode AD, the Function's subclass with a jvp (WITH_JVP). The functionals call
    this (dynamo does not see LossFunction.apply's override)."""
    if torch.compiler.is_exporting():
        return function.forward(*args)
    if not torch.compiler.is_compiling() and _forward_mode_ad_active():
        function = WITH_JVP[function]
    return function.apply(*args)


# Each Function's subclass with a jvp, for forward-mode AD. The Functions themselves have none:
# dynamo refuses to trace a Function that defines one.
WITH_JVP = {}


def with_jvp(function, jvp):
    """Registers and returns `function`'s subclass with `jvp`."""
    WITH_JVP[function] = type(function.__name__, (function,), {
        "jvp": staticmethod(jvp), "__doc__": f"{function.__name__} with forward-mode AD."})
    return WITH_JVP[function]


def _forward_mode_ad_active():
    """Whether a forward-mode AD level is open: torch.autograd.forward_ad's, or a torch.func
    jvp / jacfwd transform's."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return torch._C._are_functorch_transforms_active() and any(
        isinstance(i, JvpInterpreter) for i in retrieve_all_functorch_interpreters())


def _forward_op(op):
    """The op a Function's forward calls: `op`, or while torch.export traces, its
    differentiable twin (bottom of this file), which an exported program needs to train."""
    return _DIFFERENTIABLE[op] if torch.compiler.is_exporting() else op


def _take_forward_grads(ctx):
    """The gradients the forward wrote: handed out once, None afterwards."""
    grads = ctx.forward_grads
    ctx.forward_grads = None
    return grads


def _composite_grads(composite, grad_output, inputs_wanted):
    """First-order gradients of composite(*inputs), a loss written with torch ops, that autograd
    can differentiate again (create_graph=True). torch.func.vjp rather than autograd.grad: it
    also works where a torch.func transform runs this backward on tensors that do not require
    grad at its level (jacrev's vmap over the backward)."""
    inputs = [t for t, wanted in inputs_wanted if wanted]

    def loss_of_wanted(*wanted_inputs):
        given = iter(wanted_inputs)
        return composite(*(next(given) if wanted else t for t, wanted in inputs_wanted))

    loss, vjp = torch.func.vjp(loss_of_wanted, *inputs)
    grads = iter(vjp(grad_output.reshape(loss.shape)))
    return tuple(next(grads) if wanted else None for _, wanted in inputs_wanted)


# ---------------------------------------------------------------------------------------------
# Pointwise losses


def _pointwise_forward_grads_wanted(input, target, reduction):
    """(input, target): which gradients the forward writes. The one place that decides it: the
    forward and setup_context both ask here, so they always agree."""
    writes = _forward_writes_grads(reduction)
    return tuple(writes and wanted for wanted in _wants_grad(input, target))


def _pointwise_forward(fwd, input, target, tensors, scalars, reduction):
    want_input, want_target = _pointwise_forward_grads_wanted(input, target, reduction)
    return _forward_op(fwd)(input, target, *tensors, *scalars, reduction_enum(reduction),
                            want_input, want_target)


def _pointwise_setup_context(ctx, output, input, target, tensors, scalars, reduction,
                             written=None):
    """written: (input, target) gradients the forward wrote; None: the Function's forward, which
    asks _pointwise_forward_grads_wanted."""
    _, grad_input, grad_target = output
    ctx.save_for_backward(input, target, *tensors)
    ctx.save_for_forward(input, target, *tensors)
    ctx.scalars, ctx.reduction = scalars, reduction
    if written is None:
        written = _pointwise_forward_grads_wanted(input, target, reduction)
    ctx.forward_grads = _written_grads(ctx, (grad_input, grad_target), written)


def _pointwise_backward(ctx, grad_output, bwd, bwd_into, composite):
    if grad_output is None:  # an undefined grad_output (gradients are not materialized)
        return None, None
    want_input, want_target = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    forward_grads = _take_forward_grads(ctx)
    if torch.is_grad_enabled():
        input, target, *tensors = ctx.saved_tensors
        return _composite_grads(
            lambda x, y: composite(x, y, *tensors, *ctx.scalars, ctx.reduction), grad_output,
            [(input, want_input), (target, want_target)])
    if forward_grads is None:
        input, target, *tensors = ctx.saved_tensors
        grad_input, grad_target = bwd(
            grad_output, input, target, *tensors, *ctx.scalars,
            reduction_enum(ctx.reduction), want_input, want_target,
        )
        return _none_if_empty(grad_input, want_input), _none_if_empty(grad_target, want_target)
    input, target, *tensors = ctx.saved_tensors

    def recompute_into(grad_input, grad_target):
        bwd_into(grad_input, grad_target, grad_output, input, target, *tensors, *ctx.scalars,
                 reduction_enum(ctx.reduction))

    return _finish_forward_grads(forward_grads, grad_output, recompute_into)


def _composite_jvp(composite, primals_tangents):
    """Forward-mode derivative (torch.autograd.forward_ad, torch.func.jvp, jacfwd, hessian) of
    composite(*primals), a loss written with torch ops (as double backward differentiates), in
    the tangents (a primal whose tangent is None is a constant). J t as the gradient in u of
    <J^T u, t>, by reverse mode twice: torch.func.jvp here would nest forward-mode AD, which
    torch does not support."""
    if sum(isinstance(i, JvpInterpreter) for i in retrieve_all_functorch_interpreters()) > 1:
        # the outer transform would see this tangent as a constant: a silent zero
        raise NotImplementedError(
            "torch_losses: forward-mode AD over forward-mode AD (e.g. jacfwd(jacfwd(loss))) is "
            "not supported; for second derivatives use torch.func.hessian (jacfwd of jacrev) "
            "or jacrev twice")
    moving = [(p, t) for p, t in primals_tangents if t is not None]

    def loss_of_moving(*values):
        values = iter(values)
        return composite(*(p if t is None else next(values) for p, t in primals_tangents))

    loss, pullback = torch.func.vjp(loss_of_moving, *(p for p, _ in moving))

    def pullback_along_tangents(u):
        return sum((g * t).sum() for g, (_, t) in zip(pullback(u), moving))

    return torch.func.grad(pullback_along_tangents)(torch.zeros_like(loss))


def _pointwise_jvp(composite):
    """The jvp of a pointwise Function whose loss as torch ops is `composite`."""
    def jvp(ctx, input_tangent, target_tangent, *_unused):
        input, target, *tensors = ctx.saved_tensors
        loss_tangent = _composite_jvp(
            lambda x, y: composite(x, y, *tensors, *ctx.scalars, ctx.reduction),
            ((input, input_tangent), (target, target_tangent)))
        return loss_tangent, None, None

    return jvp


class BCEWithLogitsFunction(LossFunction):
    """binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction).

    weight and pos_weight are None or of input's shape; reduction is 'none', 'mean' or 'sum'.
    Differentiable in input and target."""

    @staticmethod
    def forward(input, target, weight=None, pos_weight=None, reduction="mean"):
        return _pointwise_forward(ops.bce_with_logits_fwd, input, target,
                                  (weight, pos_weight), (), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction = inputs
        _pointwise_setup_context(ctx, output, input, target, (weight, pos_weight), (), reduction)

    @staticmethod
    def composite(x, y, w, pw, reduction):
        return F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw)

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        grads = _pointwise_backward(ctx, grad_output, ops.bce_with_logits_bwd,
                                    ops.bce_with_logits_bwd_into_,
                                    BCEWithLogitsFunction.composite)
        return (*grads, None, None, None)



class HuberFunction(LossFunction):
    """huber_loss(input, target, weight, delta, reduction): weight None or of input's shape."""

    @staticmethod
    def forward(input, target, weight=None, delta=1.0, reduction="mean"):
        return _pointwise_forward(ops.huber_fwd, input, target, (weight,), (delta,),
                                  reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, delta, reduction = inputs
        _pointwise_setup_context(ctx, output, input, target, (weight,), (delta,), reduction)

    @staticmethod
    def composite(x, y, w, delta, reduction):
        return _reduce(_weighted(F.huber_loss(x, y, reduction="none", delta=delta), w),
                       reduction)

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        grads = _pointwise_backward(ctx, grad_output, ops.huber_bwd, ops.huber_bwd_into_,
                                    HuberFunction.composite)
        return (*grads, None, None, None)



class MSEFunction(LossFunction):
    """mse_loss(input, target, weight, reduction): (x - y)^2 times weight; 'mean' divides by
    the number of elements (the functional handles torch's weighted mean)."""

    @staticmethod
    def forward(input, target, weight=None, reduction="mean"):
        return _pointwise_forward(ops.mse_fwd, input, target, (weight,), (), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        _pointwise_setup_context(ctx, output, input, target, (weight,), (), reduction)

    @staticmethod
    def composite(x, y, w, reduction):
        return _reduce(_weighted((x - y) ** 2, w), reduction)

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        grads = _pointwise_backward(ctx, grad_output, ops.mse_bwd, ops.mse_bwd_into_,
                                    MSEFunction.composite)
        return (*grads, None, None)



class L1Function(LossFunction):
    """l1_loss(input, target, weight, reduction): |x - y| times weight."""

    @staticmethod
    def forward(input, target, weight=None, reduction="mean"):
        return _pointwise_forward(ops.l1_fwd, input, target, (weight,), (), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        _pointwise_setup_context(ctx, output, input, target, (weight,), (), reduction)

    @staticmethod
    def composite(x, y, w, reduction):
        return _reduce(_weighted((x - y).abs(), w), reduction)

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        grads = _pointwise_backward(ctx, grad_output, ops.l1_bwd, ops.l1_bwd_into_,
                                    L1Function.composite)
        return (*grads, None, None)



class SmoothL1Function(LossFunction):
    """smooth_l1_loss(input, target, beta, reduction)."""

    @staticmethod
    def forward(input, target, beta=1.0, reduction="mean"):
        return _pointwise_forward(ops.smooth_l1_fwd, input, target, (), (beta,), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, beta, reduction = inputs
        _pointwise_setup_context(ctx, output, input, target, (), (beta,), reduction)

    @staticmethod
    def composite(x, y, beta, reduction):
        return F.smooth_l1_loss(x, y, reduction=reduction, beta=beta)

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        grads = _pointwise_backward(ctx, grad_output, ops.smooth_l1_bwd, ops.smooth_l1_bwd_into_,
                                    SmoothL1Function.composite)
        return (*grads, None, None)



class BCEFunction(LossFunction):
    """binary_cross_entropy(input, target, weight, reduction) on probabilities."""

    @staticmethod
    def forward(input, target, weight=None, reduction="mean"):
        return _pointwise_forward(ops.bce_fwd, input, target, (weight,), (), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, reduction = inputs
        _pointwise_setup_context(ctx, output, input, target, (weight,), (), reduction)

    @staticmethod
    def composite(x, y, w, reduction):
        return F.binary_cross_entropy(x, y, w, reduction=reduction)

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        grads = _pointwise_backward(ctx, grad_output, ops.bce_bwd, ops.bce_bwd_into_,
                                    BCEFunction.composite)
        return (*grads, None, None)



class HingeFunction(LossFunction):
    """hinge_loss(input, target, margin, reduction): max(0, margin - y x), y in {-1, +1}."""

    @staticmethod
    def forward(input, target, margin=1.0, reduction="mean"):
        return _pointwise_forward(ops.hinge_fwd, input, target, (), (margin,), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, margin, reduction = inputs
        _pointwise_setup_context(ctx, output, input, target, (), (margin,), reduction)

    @staticmethod
    def composite(x, y, margin, reduction):
        # clamp_min(0) with the kink's gradient -y on every torch (2.14's clamp_min passes 0)
        v = margin - y * x
        return _reduce(torch.where(v >= 0, v, v.clamp_min(0)), reduction)

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        grads = _pointwise_backward(ctx, grad_output, ops.hinge_bwd, ops.hinge_bwd_into_,
                                    HingeFunction.composite)
        return (*grads, None, None)



class KLDivFunction(LossFunction):
    """kl_div(input, target, log_target, reduction) with reduction 'none', 'mean' (over
    elements) or 'sum'; the functional adds 'batchmean'."""

    @staticmethod
    def forward(input, target, log_target=False, reduction="mean"):
        return _pointwise_forward(ops.kl_div_fwd, input, target, (), (log_target,),
                                  reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, log_target, reduction = inputs
        _pointwise_setup_context(ctx, output, input, target, (), (log_target,), reduction)

    @staticmethod
    def composite(x, y, log_target, reduction):
        return _reduce(F.kl_div(x, y, reduction="none", log_target=log_target), reduction)

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        grads = _pointwise_backward(ctx, grad_output, ops.kl_div_bwd, ops.kl_div_bwd_into_,
                                    KLDivFunction.composite)
        return (*grads, None, None)



# ---------------------------------------------------------------------------------------------
# Cross-entropy


def classes_innermost(input):
    """Logits (N, C, d1..dk) whose classes are their innermost dimension in memory (channels_last
    (N, C, H, W), an (N, d, C) tensor seen as (N, C, d)), not contiguous as they stand."""
    return (input.dim() > 2 and input.numel() > 0 and not input.is_contiguous()
            and input.movedim(1, -1).is_contiguous())


def fold_class_dim(input, target):
    """input (C), (N, C) or (N, C, d1..dk) -> (N, C, D); target to (N, D) or (N, C, D).
    Logits whose classes are innermost (classes_innermost) fold to rows (N D, C, 1) instead,
    a view: every backend reads them in place, and the gradient comes in their layout
    (unfold_grad)."""
    probs = target.shape == input.shape
    if classes_innermost(input):
        C = input.shape[1]
        x = input.movedim(1, -1).reshape(-1, C, 1)
        t = target.movedim(1, -1).reshape(x.shape) if probs else target.reshape(-1, 1)
        return x, t, probs
    if input.dim() == 1:
        x = input.reshape(1, input.shape[0], 1)
    else:
        x = input.reshape(input.shape[0], input.shape[1], math.prod(input.shape[2:]))
    t = target.reshape(x.shape) if probs else target.reshape(x.shape[0], x.shape[2])
    return x, t, probs


def unfold_grad(grad, input):
    """A gradient of fold_class_dim's x back in input's shape (and, for folded rows, in the
    layout of input's)."""
    if not classes_innermost(input):
        return grad.view(input.shape)
    return grad.view(input.movedim(1, -1).shape).movedim(-1, 1)


def cross_entropy_composite(input, target, weight, ignore_index, label_smoothing, reduction,
                            z_loss, softcap):
    """cross_entropy with z-loss and soft-capping as torch ops (differentiable twice): the
    double-backward path, and the fallback where there is nothing to fuse (no class)."""
    x = input if softcap is None else softcap * torch.tanh(input / softcap)
    loss = F.cross_entropy(x, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss == 0:
        return loss
    lse = torch.logsumexp(x, dim=0 if x.dim() == 1 else 1)
    if target.shape == input.shape:  # probabilities: every row counts, 'mean' over the rows
        z = z_loss * lse.square()
        denominator = lse.numel()
    else:
        kept = target != ignore_index
        z = torch.where(kept, z_loss * lse.square(), 0.0)
        if weight is None:
            denominator = kept.sum()
        else:
            safe = torch.where(kept, target, 0).clamp(0, max(weight.numel() - 1, 0))
            denominator = torch.where(kept, weight[safe], 0.0).sum()
    if reduction == "none":
        return loss + z.to(loss.dtype)
    if reduction == "sum":
        return loss + z.sum().to(loss.dtype)
    return loss + (z.sum() / denominator).to(loss.dtype)


def lse_of(row_stats):
    """The log-sum-exp m + log s from the cross_entropy ops' row statistics (K, ...): the same
    rounded sum the kernels form for the z-loss. The ops keep m and log s apart for backward,
    whose softmax would lose up to ulp(lse)/2 of accuracy from the rounded sum."""
    return row_stats[0] + row_stats[1]


def _cross_entropy_backward(ctx, grad_output):
    """CrossEntropyFunction.backward: the forward's gradients finished for grad_output, or one
    cross_entropy_bwd pass ('none', a retained graph), or the composite for double backward."""
    if grad_output is None:  # an undefined grad_output (gradients are not materialized)
        return None, None
    want_input = ctx.needs_input_grad[0]
    want_target = ctx.needs_input_grad[1]
    forward_grads = _take_forward_grads(ctx)
    ignore_index, label_smoothing, reduction, z_loss, softcap = ctx.options
    shape = ctx.input_shape
    if ctx.inplace:
        if forward_grads is None or torch.is_grad_enabled():
            raise RuntimeError(
                "torch_losses.cross_entropy: with inplace_backward=True the logits are "
                "overwritten by their gradient, which backward hands out once; a second "
                "backward (retain_graph) or double backward (create_graph) needs "
                "inplace_backward=False")
        if reduction == "none":  # (N, D), the folded positions of contiguous logits
            rows = (1, 1) if len(shape) == 1 else (shape[0], math.prod(shape[2:]))
            grad_output = grad_output.reshape(rows)
        ops.scale_grad_(forward_grads[0], grad_output)  # the logits are gone: scale, not recompute
        return forward_grads[0].view(shape), None
    input, target, weight, row_stats = ctx.saved_tensors
    if torch.is_grad_enabled():
        weight = None if weight is None else weight.to(input.dtype)
        return _composite_grads(
            lambda x, t: cross_entropy_composite(x, t, weight, ignore_index, label_smoothing,
                                                 reduction, z_loss, softcap),
            grad_output, [(input, want_input), (target, want_target)])
    x, t, probs = fold_class_dim(input, target)
    if reduction == "none":  # per position, in x's (N, D) order
        grad_output = grad_output.reshape(x.shape[0], x.shape[2])
    if forward_grads is None:
        grad_input, grad_target = ops.cross_entropy_bwd(
            grad_output, x, t, weight, row_stats, ignore_index, label_smoothing,
            reduction_enum(reduction), want_input, probs and want_target, z_loss, softcap)
        forward_grads = (_none_if_empty(grad_input, want_input),
                         _none_if_empty(grad_target, probs and want_target))
    else:
        def recompute_into(grad_input, grad_target):
            ops.cross_entropy_bwd_into_(grad_input, grad_target, grad_output, x, t, weight,
                                        row_stats, ignore_index, label_smoothing,
                                        reduction_enum(reduction), z_loss, softcap)

        _finish_forward_grads(forward_grads, grad_output, recompute_into)
    return tuple(None if g is None else unfold_grad(g, input) for g in forward_grads)


def _writes_over_input(inplace_backward, input):
    """Whether the forward writes the gradient over the logits (inplace_backward). Not in an
    exported program: it holds the functional op's differentiable twin, whose formula backward
    uses."""
    return inplace_backward and input.requires_grad and not torch.compiler.is_exporting()


def _cross_entropy_setup_context(ctx, output, input, target, weight, options, inplace,
                                 written=None):
    """written: (input, target) gradients the forward wrote; None: the Function's forward, which
    asks _cross_entropy_grads_wanted."""
    _, row_stats, grad_input, grad_target = output
    ctx.inplace = inplace
    # With inplace_backward, input now holds its gradient: not saved.
    ctx.save_for_backward(None if inplace else input, target, weight, row_stats)
    # (an integer tensor saved for forward AD trips an assert: class indices go as they are)
    ctx.save_for_forward(None if inplace else input, target if target.is_floating_point() else
                         None, weight)
    ctx.class_indices = None if target.is_floating_point() else target
    ctx.options = options
    ctx.input_shape = input.shape
    if written is None:
        written = _cross_entropy_grads_wanted(input, target, options[2])
    ctx.forward_grads = _written_grads(ctx, (grad_input, grad_target), written, (row_stats,))
    if inplace:
        ctx.forward_grads = (fold_class_dim(input.detach(), target)[0], None)


def _cross_entropy_jvp(ctx, input_tangent, target_tangent, *_unused):
    """The loss's tangent, from the composite of torch ops (as double backward)."""
    if ctx.inplace:
        raise RuntimeError("torch_losses.cross_entropy: forward-mode AD needs "
                           "inplace_backward=False (the logits are overwritten)")
    input, target, weight = ctx.saved_tensors
    target = ctx.class_indices if target is None else target
    ignore_index, label_smoothing, reduction, z_loss, softcap = ctx.options
    weight = None if weight is None else weight.to(input.dtype)

    def composite(x, t):
        return cross_entropy_composite(x, t, weight, ignore_index, label_smoothing, reduction,
                                       z_loss, softcap)

    if not target.is_floating_point():
        target_tangent = None
    loss_tangent = _composite_jvp(composite, ((input, input_tangent), (target, target_tangent)))
    return loss_tangent, None, None, None


def _cross_entropy_grads_wanted(input, target, reduction):
    """(input, target): which gradients the (not in-place) forward writes; forward and
    setup_context both ask here."""
    writes = _forward_writes_grads(reduction)
    want_input, want_target = _wants_grad(input, target)
    return writes and want_input, writes and want_target and target.shape == input.shape


class CrossEntropyFunction(LossFunction):
    """cross_entropy(input, target, weight, ignore_index, label_smoothing, reduction,
    inplace_backward, z_loss, softcap).

    input (C), (N, C) or (N, C, d1..dk); target class indices (int64, input's shape without the
    class dim) or probabilities (input's shape). Differentiable in input, and in probability
    targets. inplace_backward=True writes the gradient over input (class indices only).
    z_loss adds z_loss * lse^2 per non-ignored position; softcap (None or > 0) caps the logits
    by softcap * tanh(x / softcap) first (see functional.cross_entropy)."""

    @staticmethod
    def forward(input, target, weight=None, ignore_index=-100, label_smoothing=0.0,
                reduction="mean", inplace_backward=False, z_loss=0.0, softcap=None):
        """Returns (loss, row_stats, grad_input, grad_target); apply() returns the loss.
        row_stats: the ops' per-position statistics (lse_of gives the log-sum-exp)."""
        x, t, probs = fold_class_dim(input, target)
        red = reduction_enum(reduction)
        if _writes_over_input(inplace_backward, input):
            loss, row_stats = ops.cross_entropy_fwd_inplace(x, t, weight, ignore_index,
                                                      label_smoothing, red, z_loss, softcap)
            # Tell autograd: any other node that saved these logits now raises in backward.
            torch.autograd.graph.increment_version(input)
            # The gradient is the input itself now (setup_context takes it from there).
            grad_input = grad_target = input.new_empty((0,))
        else:
            want_input, want_target = _cross_entropy_grads_wanted(input, target, reduction)
            loss, row_stats, grad_input, grad_target = _forward_op(ops.cross_entropy_fwd)(
                x, t, weight, ignore_index, label_smoothing, red, want_input, want_target,
                z_loss, softcap)
        if red == 0:
            loss = loss.reshape(input.shape[:1] + input.shape[2:] if input.dim() > 1 else ())
        return loss, row_stats, grad_input, grad_target

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, target, weight, ignore_index, label_smoothing, reduction, inplace_backward,
         z_loss, softcap) = inputs
        _cross_entropy_setup_context(
            ctx, output, input, target, weight,
            (ignore_index, label_smoothing, reduction, z_loss, softcap),
            _writes_over_input(inplace_backward, input))

    @staticmethod
    def backward(ctx, grad_output, *_unused):
        return (*_cross_entropy_backward(ctx, grad_output), *(None,) * 7)


class CrossEntropyLseFunction(CrossEntropyFunction):
    """CrossEntropyFunction whose apply returns forward's whole tuple (loss, row_stats, ...):
    the per-position lse for logging (lse_of(row_stats)), from the same pass."""

    returns_loss_only = False


for _function in (BCEWithLogitsFunction, HuberFunction, MSEFunction, L1Function,
                  SmoothL1Function, BCEFunction, HingeFunction, KLDivFunction):
    with_jvp(_function, _pointwise_jvp(_function.composite))
for _function in (CrossEntropyFunction, CrossEntropyLseFunction):
    with_jvp(_function, _cross_entropy_jvp)


# ---------------------------------------------------------------------------------------------
# Differentiable twins of the forward ops, for torch.export: an exported program keeps ops, not
# Functions, so the ops it holds must carry the Functions' formulas. Their
# setup_context takes the gradients the op was asked to write (its input_grad/target_grad
# arguments, honoured for mean and sum) as the forward's. The plain ops get no Python autograd
# kernel: it would cost every eager and compiled call a few microseconds.

_TWINS = torch.library.Library("torch_losses", "FRAGMENT")


def _register_op_autograd(name, setup_context, backward, differentiable):
    """torch_losses::name gets `backward` (a Function's, returning the gradients of the op's
    first `differentiable` arguments first) and `setup_context(ctx, op_inputs, output)`."""
    arguments = len(getattr(ops, name).default._schema.arguments)

    def op_backward(ctx, *grads):
        grads = backward(ctx, *grads)[:differentiable]
        return (*grads, *(None,) * (arguments - differentiable))

    torch.library.register_autograd(f"torch_losses::{name}", op_backward,
                                    setup_context=setup_context)


def _differentiable_twin(name, setup_context, backward, differentiable):
    """Defines torch_losses::<name>_differentiable: `name`'s schema and kernels (fake ones
    included: it calls the plain op) with an autograd formula. Returns the plain op's packet
    and the twin's."""
    plain = getattr(ops, name)
    schema = str(plain.default._schema)
    twin = f"{name}_differentiable"
    _TWINS.define(twin + schema[schema.index("("):])

    def kernel(*args):
        return plain.default(*args)

    _TWINS.impl(twin, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"torch_losses::{twin}", kernel, lib=_TWINS)
    _register_op_autograd(twin, setup_context, backward, differentiable)
    return plain, getattr(ops, twin)


def _pointwise_op_setup_context(tensors):
    """setup_context of a pointwise *_fwd op: (input, target, `tensors` optional tensors, its
    scalars, reduction, input_grad, target_grad)."""
    def setup_context(ctx, inputs, output):
        input, target, *options, reduction, input_grad, target_grad = inputs
        writes = reduction != REDUCTIONS["none"]
        _pointwise_setup_context(ctx, output, input, target, tuple(options[:tensors]),
                                 tuple(options[tensors:]), REDUCTION_NAMES[reduction],
                                 (writes and input_grad, writes and target_grad))

    return setup_context


def _cross_entropy_op_setup_context(ctx, inputs, output):
    (input, target, weight, ignore_index, label_smoothing, reduction, input_grad, target_grad,
     z_loss, softcap) = inputs
    writes = reduction != REDUCTIONS["none"]
    probs = target.dim() == input.dim()
    _cross_entropy_setup_context(
        ctx, output, input, target, weight,
        (ignore_index, label_smoothing, REDUCTION_NAMES[reduction], z_loss, softcap),
        False, (writes and input_grad, writes and probs and target_grad))


_POINTWISE_FUNCTIONS = {  # op name: (its Function, how many optional tensors follow target)
    "bce_with_logits": (BCEWithLogitsFunction, 2), "huber": (HuberFunction, 1),
    "mse": (MSEFunction, 1), "l1": (L1Function, 1), "smooth_l1": (SmoothL1Function, 0),
    "bce": (BCEFunction, 1), "hinge": (HingeFunction, 0), "kl_div": (KLDivFunction, 0),
}
_DIFFERENTIABLE = dict(
    [_differentiable_twin(f"{name}_fwd", _pointwise_op_setup_context(tensors),
                          function.backward, 2)
     for name, (function, tensors) in _POINTWISE_FUNCTIONS.items()]
    + [_differentiable_twin("cross_entropy_fwd", _cross_entropy_op_setup_context,
                            CrossEntropyFunction.backward, 2)])
