"""Linear layer + cross-entropy without the (N, C) logits: torch's linear_cross_entropy, fused
and chunked.

The rows of the input go through in chunks sized from a memory budget. Per chunk: one matmul
to logits, the cross-entropy forward op writing the logits' gradient over them, and while the
chunk is hot the gradient matmuls grad_input[chunk] = G @ W, grad_W += G^T @ x[chunk] and
grad_bias += sum(G). The forward therefore returns the loss and all gradients (for
grad_output = 1); backward only scales them by grad_output. Extra memory is one chunk of
logits on top of the gradients autograd needs anyway.

reduction='none' (a per-row grad_output that the forward cannot know) and a second backward
through a retained graph recompute the chunks in backward with the cross_entropy_bwd op.
Double backward (create_graph=True) differentiates a composite of torch ops.

The chunk loops are two custom ops (torch_losses::linear_cross_entropy_fwd / _bwd): opaque to
torch.compile, which sees one node with fake shapes instead of unrolling a loop whose trip
count depends on N.
"""
import math

import torch
import torch.nn.functional as F
from torch.autograd import Function

from ._autograd import REDUCTION_NAMES, _composite_grads, _composite_jvp, _none_if_empty, \
    _register_op_autograd, _take_forward_grads, apply_function, cross_entropy_composite, lse_of, \
    ops, reduction_enum, with_jvp
from ._fake import row_stats_count
from . import functional as _functional  # a cycle: functional re-exports this module's API

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss", "LinearCrossEntropyFunction"]

# Bytes of logits (plus their gradient, where it needs its own buffer) per chunk by default.
# CPU: on the 2-core benchmark machine a matmul of 256 rows ran ~20% slower than one of 2048,
# of 512 rows ~10%; 48 MiB (~390 rows at 32000 float32 classes) keeps 2048 x 1024 -> 32000
# under a quarter of torch's peak memory. GPUs want bigger matmuls.
DEFAULT_CHUNK_BYTES = {"cpu": 48 << 20}
DEFAULT_CHUNK_BYTES_OTHER = 256 << 20

_NONE, _MEAN, _SUM = 0, 1, 2

# Test hook: called with every logits chunk the ops allocate (tests count chunks and bytes).
_logits_chunk_hook = None


def chunk_rows(num_classes, bytes_per_logit, device, chunk_bytes=None):
    """Rows per chunk so that a chunk's buffers, bytes_per_logit per logit (all buffers
    together), fit in chunk_bytes (default: DEFAULT_CHUNK_BYTES for the device type). At
    least one row."""
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(torch.device(device).type,
                                              DEFAULT_CHUNK_BYTES_OTHER)
    rows = chunk_bytes // (max(1, num_classes) * bytes_per_logit)
    return max(1, rows - rows % 8 if rows >= 16 else rows)  # multiples of 8 suit the matmuls


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mean_denominator(target, weight, ignore_index, num_classes, probs):
    """torch's 'mean' denominator, on the device: the number of rows for probability
    targets, else the sum of the class weights of the non-ignored targets."""
    if probs:
        return torch.full((), target.shape[0], dtype=torch.float64, device=target.device)
    kept = target != ignore_index
    if weight is None:
        return kept.sum().to(torch.float64)
    safe = torch.where(kept, target, 0).clamp(0, max(num_classes - 1, 0))
    return torch.where(kept, weight.to(torch.float64)[safe], 0.0).sum()


def _gradient_scale(reduction, denominator):
    """What the summed gradients get multiplied by: 1/denominator for 'mean' (0 when nothing
    counted: torch's gradients are then zeros, not nan), else None (no scaling)."""
    if reduction != _MEAN:
        return None
    return torch.where(denominator == 0, 0.0, 1.0 / denominator)


class _Accumulators:
    """The gradients of the chunk loop. grad_W and grad_bias of low-precision weights sum
    in float32 and round once at the end."""

    def __init__(self, input, linear_weight, target, linear_bias, wants):
        want_input, want_weight, want_bias, want_target = wants
        self.input = torch.empty_like(input) if want_input else None
        # written by the first chunk (zero-filling it would be one more pass over C x H)
        self.weight = (torch.empty(linear_weight.shape, dtype=_acc_dtype(linear_weight.dtype),
                                   device=linear_weight.device) if want_weight else None)
        self.weight_written = False
        self.bias = (torch.zeros(linear_bias.shape, dtype=_acc_dtype(linear_bias.dtype),
                                 device=linear_bias.device) if want_bias else None)
        self.target = torch.empty_like(target) if want_target else None
        self.out_dtypes = (input.dtype, linear_weight.dtype,
                           None if linear_bias is None else linear_bias.dtype)

    def add_chunk(self, rows, grad_logits, x, linear_weight, scale):
        """grad_logits (r, C) of the rows `rows` (a slice) in the linear's dtype."""
        if self.input is not None:
            if scale is None or scale.dtype == self.input.dtype:
                gx = torch.mm(grad_logits, linear_weight, out=self.input[rows])
                if scale is not None:
                    gx.mul_(scale)
            else:  # low precision: scale the float32 product, then round once more
                self.input[rows] = torch.mm(grad_logits, linear_weight).float().mul_(scale)
        if self.weight is not None:
            if self.weight.dtype != grad_logits.dtype:  # low precision: scaled in results()
                product = torch.mm(grad_logits.t(), x)
                if self.weight_written:
                    self.weight.add_(product)
                else:
                    self.weight.copy_(product)
            else:
                # G^T (x s): scaling the (rows, H) chunk of x, not the (C, H) sum
                xs = x if scale is None else x * scale
                if self.weight_written:
                    self.weight.addmm_(grad_logits.t(), xs)
                else:
                    torch.mm(grad_logits.t(), xs, out=self.weight)
            self.weight_written = True
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0, dtype=self.bias.dtype))

    def results(self, scale, like):
        """(grad_input, grad_weight, grad_bias, grad_target), empty where not wanted; scale
        (1/denominator for 'mean') applies to those that add_chunk did not scale."""
        out = [like.new_empty((0,)) if self.input is None else self.input]
        if self.weight is not None and not self.weight_written:  # no rows
            self.weight.zero_()
        for grad, dtype in ((self.weight, self.out_dtypes[1]), (self.bias, self.out_dtypes[2]),
                            (self.target, self.out_dtypes[0])):
            if grad is None:
                out.append(like.new_empty((0,)))  # a fresh one each: outputs must not alias
                continue
            scaled_by_add_chunk = grad is self.weight and grad.dtype == dtype
            if scale is not None and not scaled_by_add_chunk:
                grad.mul_(scale.to(grad.dtype))
            out.append(grad.to(dtype))
        return out


def _chunks(n, max_rows):
    """As few chunks as max_rows allows, of near-equal size (a short last chunk would run a
    slow small matmul): multiples of 8 rows where that stays within max_rows."""
    if n == 0:
        return []
    count = -(-n // max_rows)
    rows = -(-n // count)
    if rows % 8 and rows - rows % 8 + 8 <= max_rows:
        rows += 8 - rows % 8
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


class _LogitsBuffer:
    """The chunks' logits, in one buffer made by the first chunk and reused by the next ones:
    a fresh chunk-sized tensor per chunk would fault its pages in again each time (large
    allocations go back to the OS when freed)."""

    def __init__(self):
        self.buffer = None

    def __call__(self, x, linear_weight, linear_bias):
        rows = x.shape[0]
        if self.buffer is None or self.buffer.shape[0] < rows:
            self.buffer = F.linear(x, linear_weight, linear_bias)
            return self.buffer
        out = self.buffer[:rows]
        if linear_bias is None:  # as F.linear computes it, so the same bits
            return torch.mm(x, linear_weight.t(), out=out)
        return torch.addmm(linear_bias, x, linear_weight.t(), out=out)


def _logits(x, linear_weight, linear_bias, upcast, make_logits):
    """One chunk of logits in the linear's dtype (from make_logits, a _LogitsBuffer), and the
    tensor the cross-entropy op works on (a float32 copy under autocast, where torch computes
    the loss in float32)."""
    logits = make_logits(x, linear_weight, linear_bias)
    if _logits_chunk_hook is not None:
        _logits_chunk_hook(logits)
    ce_input = logits.float() if upcast and logits.dtype != torch.float32 else logits
    return logits, ce_input


@torch.library.custom_op("torch_losses::linear_cross_entropy_fwd", mutates_args=())
def _linear_cross_entropy_fwd(
        input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor,
        linear_bias: torch.Tensor | None, weight: torch.Tensor | None, ignore_index: int,
        label_smoothing: float, reduction: int, upcast: bool, rows_per_chunk: int,
        input_grad: bool, weight_grad: bool, bias_grad: bool, target_grad: bool,
        z_loss: float = 0.0, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input (N, H), linear_weight (C, H), target (N) class indices or (N, C) probabilities.
    Returns (loss, row_stats, grad_input, grad_linear_weight, grad_linear_bias, grad_target), the
    gradients for grad_output = 1 where asked for (never for reduction 'none'), else empty.
    z_loss and softcap: as the cross_entropy ops' (each chunk's rows get them)."""
    n, num_classes = input.shape[0], linear_weight.shape[0]
    probs = target.dim() == 2
    wants = (input_grad, weight_grad, bias_grad, target_grad)
    wants = tuple(w and reduction != _NONE for w in wants)
    want_logits_grad = any(wants)
    ce_dtype = torch.float32 if upcast and input.dtype != torch.float64 else input.dtype
    row_loss = input.new_empty((n,), dtype=ce_dtype)
    row_stats = input.new_empty((row_stats_count(probs), n), dtype=_acc_dtype(ce_dtype))
    acc = _Accumulators(input, linear_weight, target, linear_bias, wants)
    if reduction == _NONE:
        scale = None
    else:
        denominator = _mean_denominator(target, weight, ignore_index, num_classes, probs)
        scale = _gradient_scale(reduction, denominator)
        if scale is not None:
            scale = scale.to(_acc_dtype(input.dtype))
    make_logits = _LogitsBuffer()
    for rows in _chunks(n, rows_per_chunk):
        x, t = input[rows], target[rows]
        logits, ce_input = _logits(x, linear_weight, linear_bias, upcast, make_logits)
        ce_input3 = ce_input.unsqueeze(-1)
        t2 = t.unsqueeze(-1)
        if not want_logits_grad:
            loss, chunk_stats, _, _ = ops.cross_entropy_fwd(
                ce_input3, t2, weight, ignore_index, label_smoothing, _NONE, False, False,
                z_loss, softcap)
            grad = None
        elif probs:
            loss, chunk_stats, grad, grad_t = ops.cross_entropy_fwd(
                ce_input3, t2, weight, ignore_index, label_smoothing, _NONE, True, wants[3],
                z_loss, softcap)
            grad = grad.squeeze(-1)
            if wants[3]:
                acc.target[rows] = grad_t.squeeze(-1)
        else:
            loss, chunk_stats = ops.cross_entropy_fwd_inplace(
                ce_input3, t2, weight, ignore_index, label_smoothing, _NONE, z_loss, softcap)
            grad = ce_input
        row_loss[rows] = loss.squeeze(-1)
        row_stats[:, rows] = chunk_stats.squeeze(-1)
        if want_logits_grad:
            if grad.dtype != logits.dtype:
                grad = logits.copy_(grad)
            acc.add_chunk(rows, grad, x, linear_weight, scale)
        del logits, ce_input, ce_input3, grad  # the next chunk reuses the logits buffer
    if reduction == _NONE:
        loss = row_loss
    else:
        total = row_loss.sum(dtype=_acc_dtype(ce_dtype))
        if reduction == _MEAN:
            total = total / denominator.to(total.dtype)  # nothing counted: 0/0 = nan, as torch
        loss = total.to(ce_dtype)
    return (loss, row_stats, *acc.results(scale, input))


@_linear_cross_entropy_fwd.register_fake
def _(input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
      reduction, upcast, rows_per_chunk, input_grad, weight_grad, bias_grad, target_grad,
      z_loss=0.0, softcap=None):
    ce_dtype = torch.float32 if upcast and input.dtype != torch.float64 else input.dtype
    n = input.shape[0]
    loss = input.new_empty((n,) if reduction == _NONE else (), dtype=ce_dtype)
    row_stats = input.new_empty((row_stats_count(target.dim() == 2), n),
                                dtype=_acc_dtype(ce_dtype))
    live = reduction != _NONE

    def grad(like, wanted):
        return torch.empty_like(like) if wanted and live else input.new_empty((0,))

    return (loss, row_stats, grad(input, input_grad), grad(linear_weight, weight_grad),
            grad(linear_bias, bias_grad), grad(target, target_grad))


@torch.library.custom_op("torch_losses::linear_cross_entropy_bwd", mutates_args=())
def _linear_cross_entropy_bwd(
        grad_output: torch.Tensor, input: torch.Tensor, linear_weight: torch.Tensor,
        target: torch.Tensor, linear_bias: torch.Tensor | None, weight: torch.Tensor | None,
        row_stats: torch.Tensor, ignore_index: int, label_smoothing: float, reduction: int,
        upcast: bool, rows_per_chunk: int, input_grad: bool, weight_grad: bool,
        bias_grad: bool, target_grad: bool, z_loss: float = 0.0, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients recomputed chunk by chunk from the inputs and the forward's row_stats:
    grad_output (N) for reduction 'none', else a scalar. Returns (grad_input,
    grad_linear_weight, grad_linear_bias, grad_target), empty where not asked for."""
    n, num_classes = input.shape[0], linear_weight.shape[0]
    probs = target.dim() == 2
    wants = (input_grad, weight_grad, bias_grad, target_grad)
    acc = _Accumulators(input, linear_weight, target, linear_bias, wants)
    ce_dtype = torch.float32 if upcast and input.dtype != torch.float64 else input.dtype
    chunk_reduction = _NONE if reduction == _NONE else _SUM
    if reduction == _MEAN:
        denominator = _mean_denominator(target, weight, ignore_index, num_classes, probs)
        grad_output = grad_output * _gradient_scale(reduction, denominator)
    if any(wants):
        make_logits = _LogitsBuffer()
        for rows in _chunks(n, rows_per_chunk):
            x, t = input[rows], target[rows]
            logits, ce_input = _logits(x, linear_weight, linear_bias, upcast, make_logits)
            g = grad_output[rows].unsqueeze(-1) if reduction == _NONE else grad_output
            grad, grad_t = ops.cross_entropy_bwd(
                g.to(ce_dtype), ce_input.unsqueeze(-1), t.unsqueeze(-1), weight,
                row_stats[:, rows].unsqueeze(-1), ignore_index, label_smoothing, chunk_reduction,
                True,
                target_grad, z_loss, softcap)
            if target_grad:
                acc.target[rows] = grad_t.squeeze(-1)
            grad = grad.squeeze(-1)
            if grad.dtype != logits.dtype:
                grad = logits.copy_(grad)
            acc.add_chunk(rows, grad, x, linear_weight, None)
            del logits, ce_input, grad, grad_t  # the next chunk reuses the logits buffer
    return tuple(acc.results(None, input))


@_linear_cross_entropy_bwd.register_fake
def _(grad_output, input, linear_weight, target, linear_bias, weight, row_stats, ignore_index,
      label_smoothing, reduction, upcast, rows_per_chunk, input_grad, weight_grad, bias_grad,
      target_grad, z_loss=0.0, softcap=None):
    def grad(like, wanted):
        return torch.empty_like(like) if wanted else input.new_empty((0,))

    return (grad(input, input_grad), grad(linear_weight, weight_grad),
            grad(linear_bias, bias_grad), grad(target, target_grad))


class LinearCrossEntropyFunction(Function):
    """linear_cross_entropy on input (N, H), linear_weight (C, H), target (N) class indices
    or (N, C) probabilities; linear_bias (C) or None, weight (C) or None; reduction 'none',
    'mean' or 'sum'. `wants` = (input, linear_weight, linear_bias, target) gradients that the
    forward should write (the caller knows whether grad mode is on; forward has no ctx).
    `plan` = (upcast, rows per forward chunk, rows per backward chunk). `extras` = (z_loss,
    softcap) as in functional.cross_entropy. Differentiable in input, linear_weight,
    linear_bias and probability targets."""

    @staticmethod
    def forward(input, linear_weight, target, linear_bias, weight, ignore_index,
                label_smoothing, reduction, wants, plan, extras=(0.0, None)):
        upcast, fwd_rows, _ = plan
        return _linear_cross_entropy_fwd(
            input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
            reduction_enum(reduction), upcast, fwd_rows, *wants, *extras)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
         reduction, wants, plan, extras) = inputs
        loss, row_stats, *grads = output
        ctx.mark_non_differentiable(row_stats, *grads)
        ctx.set_materialize_grads(False)  # else backward gets zeros of every gradient's size
        ctx.save_for_backward(input, linear_weight, target, linear_bias, weight, row_stats)
        probs = target.is_floating_point()  # integer tensors cannot be saved for forward AD
        ctx.save_for_forward(input, linear_weight, target if probs else None, linear_bias, weight)
        ctx.class_indices = None if probs else target
        ctx.options = (ignore_index, label_smoothing, reduction, plan, extras)
        ctx.forward_grads = None if reduction == "none" else tuple(
            grad if wanted else None for grad, wanted in zip(grads, wants))

    @staticmethod
    def backward(ctx, grad_output, *_):
        ignore_index, label_smoothing, reduction, plan, extras = ctx.options
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3],
                  ctx.needs_input_grad[2])
        forward_grads = _take_forward_grads(ctx)
        if grad_output is None:  # the loss got no gradient (grads are not materialized)
            return (None,) * 11
        if torch.is_grad_enabled():  # create_graph=True: differentiate a composite
            input, linear_weight, target, linear_bias, weight, _ = ctx.saved_tensors

            gi, gw, gb, gt = _composite_grads(
                _linear_composite(ctx.options, weight), grad_output,
                [(input, wanted[0]), (linear_weight, wanted[1]), (linear_bias, wanted[2]),
                 (target, wanted[3])])
        elif forward_grads is None:  # reduction 'none', or a second backward: recompute
            input, linear_weight, target, linear_bias, weight, row_stats = ctx.saved_tensors
            upcast, _, bwd_rows = plan
            grads = _linear_cross_entropy_bwd(
                grad_output, input, linear_weight, target, linear_bias, weight, row_stats,
                ignore_index, label_smoothing, reduction_enum(reduction), upcast, bwd_rows,
                *wanted, *extras)
            gi, gw, gb, gt = (_none_if_empty(g, w) for g, w in zip(grads, wanted))
        else:
            for grad in forward_grads:
                if grad is not None:
                    ops.scale_grad_(grad, grad_output)
            gi, gw, gb, gt = forward_grads
        return gi, gw, gt, gb, None, None, None, None, None, None, None


def _linear_jvp(ctx, input_tangent, linear_weight_tangent, target_tangent, linear_bias_tangent,
                *_):
    input, linear_weight, target, linear_bias, weight = ctx.saved_tensors
    if ctx.class_indices is not None:
        target, target_tangent = ctx.class_indices, None
    loss_tangent = _composite_jvp(_linear_composite(ctx.options, weight), (
        (input, input_tangent), (linear_weight, linear_weight_tangent),
        (linear_bias, linear_bias_tangent), (target, target_tangent)))
    return (loss_tangent, *(None,) * 5)


with_jvp(LinearCrossEntropyFunction, _linear_jvp)


def _linear_composite(options, weight):
    """The loss as torch ops of (input, linear_weight, linear_bias, target): what double
    backward and forward-mode AD differentiate."""
    ignore_index, label_smoothing, reduction, plan, extras = options

    def composite(input, linear_weight, linear_bias, target):
        logits = F.linear(input, linear_weight, linear_bias)
        return cross_entropy_composite(logits.float() if plan[0] else logits, target, weight,
                                       ignore_index, label_smoothing, reduction, *extras)

    return composite


def _linear_op_setup_context(ctx, inputs, output):
    """setup_context of the linear_cross_entropy_fwd op itself (an exported program holds the
    op without the Function): the Function's, with the gradients the op was asked to write.
    Backward recomputes in chunks of the forward's rows, fewer where class-index rows then
    need a separate gradient buffer (the forward wrote over the logits)."""
    (input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
     reduction, upcast, rows_per_chunk, *wants, z_loss, softcap) = inputs
    bwd_rows = rows_per_chunk
    if target.dim() == 1:  # the bytes per logit of _linear_cross_entropy's two plans
        logit_bytes = input.dtype.itemsize
        ce_bytes = 4 if upcast and input.dtype != torch.float32 else 0
        fwd_bytes = logit_bytes + ce_bytes
        bwd_rows = max(1, rows_per_chunk * fwd_bytes // (fwd_bytes + max(ce_bytes, logit_bytes)))
    LinearCrossEntropyFunction.setup_context(ctx, (
        input, linear_weight, target, linear_bias, weight, ignore_index, label_smoothing,
        REDUCTION_NAMES[reduction], tuple(wants), (upcast, rows_per_chunk, bwd_rows),
        (z_loss, softcap)), output)


# Its backward's gradients come in the op's argument order (input, linear_weight, target,
# linear_bias), the Function's.
_register_op_autograd("linear_cross_entropy_fwd", _linear_op_setup_context,
                      LinearCrossEntropyFunction.backward, 4)


def _check_class_target(target, batch_shape):
    if target.dtype == torch.uint8:
        target = target.long()
    if target.dtype != torch.long:
        raise RuntimeError("expected target dtype to be Long or Byte, but got "
                           f"{str(target.dtype).replace('torch.', '').title()}")
    if batch_shape and (target.dim() == 0 or target.shape[0] != batch_shape[0]):
        raise ValueError(f"Expected input batch_size ({batch_shape[0]}) to match target "
                         f"batch_size ({target.shape[0] if target.dim() else 0}).")
    if target.shape != batch_shape:
        raise RuntimeError(f"Expected target size {list(batch_shape)}, got {list(target.shape)}")
    return target


def _check_linear_dtypes(input, linear_weight, linear_bias):
    """torch's F.linear errors, before any work."""
    if input.dtype != linear_weight.dtype:
        raise RuntimeError("expected m1 and m2 to have the same dtype, but got: "
                           f"{str(input.dtype)[6:]} != {str(linear_weight.dtype)[6:]}")
    if linear_bias is not None and linear_bias.dtype != input.dtype:
        raise RuntimeError("self and mat2 must have the same dtype, but got "
                           f"{str(linear_bias.dtype)[6:].title()} and "
                           f"{str(input.dtype)[6:].title()}")


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=None, label_smoothing=0.0,
                         options=None, chunk_bytes=None, z_loss=0.0, softcap=None,
                         return_lse=False):
    """torch.nn.functional.linear_cross_entropy, fused and chunked for any `options` (None
    included): the (N, C) logits never exist whole. options.batch_chunk_size, when set, is
    the rows per chunk; otherwise the rows come from chunk_bytes (bytes of logits per chunk,
    default DEFAULT_CHUNK_BYTES). Other options fields do not apply here.

    z_loss, softcap and return_lse: as in torch_losses.functional.cross_entropy, applied to
    the logits input @ linear_weight.T + linear_bias inside the chunked kernel; with
    return_lse=True the result is (loss, lse), lse of the batch's shape.

    K-dimensional losses (linear_weight (C, d1.., H)) and probability targets of another
    dtype than the logits run the reference composite (linear, then
    torch_losses.functional.cross_entropy) with the full logits."""
    extras = _functional.check_llm_extras(z_loss, softcap, return_lse)
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError("expected linear_weight with dimensionality at least 2, got "
                           f"{linear_weight.dim()}")
    batch_shape, in_features = input.shape[:-1], input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    num_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, got "
                           f"{tuple(linear_bias.shape)}")
    if out_features and not batch_shape:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
            f"requires batched input, (N, {in_features}), got unbatched input with shape "
            f"{tuple(input.shape)}")
    logits_shape = (*batch_shape, num_classes, *out_features)
    probs = target.shape == logits_shape
    if probs and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    _functional._check_same_device(input, linear_weight, target, linear_bias, weight)

    if torch.is_autocast_enabled(input.device.type):
        # What autocast does to torch's composite: the linear in the autocast dtype, the
        # loss in float32. The casts stay outside our Function, so autograd routes their
        # gradients back to the original dtype.
        dtype = torch.get_autocast_dtype(input.device.type)
        input, linear_weight = input.to(dtype), linear_weight.to(dtype)
        linear_bias = None if linear_bias is None else linear_bias.to(dtype)
        with torch.autocast(input.device.type, enabled=False):
            return _linear_cross_entropy(input, linear_weight, target, linear_bias, weight,
                                         reduction, ignore_index, label_smoothing, options,
                                         chunk_bytes, probs, out_features, logits_shape,
                                         extras, return_lse, upcast=True)
    return _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                 ignore_index, label_smoothing, options, chunk_bytes, probs,
                                 out_features, logits_shape, extras, return_lse, upcast=False)


def _linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                          ignore_index, label_smoothing, options, chunk_bytes, probs,
                          out_features, logits_shape, extras, return_lse, upcast):
    if out_features or (probs and target.dtype != input.dtype):
        in_features = input.shape[-1]
        logits = F.linear(input, linear_weight.reshape(-1, in_features),
                          None if linear_bias is None else linear_bias.reshape(-1))
        logits = logits.reshape(logits_shape)
        z_loss, softcap = extras
        return _functional.cross_entropy(logits.float() if upcast else logits, target, weight,
                                         ignore_index=ignore_index, reduction=reduction,
                                         label_smoothing=label_smoothing, z_loss=z_loss,
                                         softcap=softcap, return_lse=return_lse)
    reduction_enum(reduction)  # ValueError naming an invalid value
    if not input.is_floating_point():  # torch's linear runs; its log_softmax raises this
        raise NotImplementedError(
            f"linear_cross_entropy: expected floating point input, got {input.dtype}")
    _check_linear_dtypes(input, linear_weight, linear_bias)
    if probs:
        if not target.is_floating_point():
            raise RuntimeError("Expected floating point type for target with class "
                               "probabilities, got "
                               f"{str(target.dtype).replace('torch.', '').title()}")
    else:
        target = _check_class_target(target, input.shape[:-1])
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    num_classes = linear_weight.shape[0]
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != num_classes:
            raise RuntimeError(
                f"weight tensor should be defined either for all {num_classes} classes or no "
                f"classes but got weight tensor of shape: {list(weight.shape)}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "torch_losses.linear_cross_entropy does not differentiate with respect to "
                "weight; pass weight.detach()")
    unbatched = input.dim() == 1
    if unbatched:
        input, target = input.unsqueeze(0), target.unsqueeze(0)

    grad_mode = torch.is_grad_enabled()
    wants = tuple(t is not None and t.requires_grad and grad_mode
                  for t in (input, linear_weight, linear_bias))
    wants += (probs and target.requires_grad and grad_mode,)
    rows = None if options is None else options.batch_chunk_size
    logit_bytes = input.dtype.itemsize
    ce_bytes = 4 if upcast and input.dtype != torch.float32 else 0
    grad_bytes = max(ce_bytes, logit_bytes)
    # forward: logits (+ a float32 copy under autocast) (+ a separate gradient for
    # probability targets); backward recompute: logits (+ copy) + a separate gradient.
    fwd_rows = rows or chunk_rows(num_classes, logit_bytes + ce_bytes +
                                  (grad_bytes if probs else 0), input.device, chunk_bytes)
    bwd_rows = rows or chunk_rows(num_classes, logit_bytes + ce_bytes + grad_bytes,
                                  input.device, chunk_bytes)
    weight = None if weight is None else weight.detach()
    loss, row_stats, *_ = apply_function(  # exporting: the op alone, with its own formula
        LinearCrossEntropyFunction, input, linear_weight, target, linear_bias, weight, ignore_index,
        float(label_smoothing), reduction, wants, (upcast, fwd_rows, bwd_rows), extras)
    if unbatched and reduction == "none":
        loss = loss.squeeze(0)
    if return_lse:
        lse = lse_of(row_stats)
        return loss, (lse.squeeze(0) if unbatched else lse).detach()
    return loss


class _LinearCrossEntropyForward:
    """forward() of torch's LinearCrossEntropyLoss, calling ours."""

    def forward(self, input, target):
        weight = self.linear.weight.reshape(
            (self.num_classes, *self.out_features, self.linear.in_features))
        bias = (None if self.linear.bias is None
                else self.linear.bias.reshape((self.num_classes, *self.out_features)))
        return linear_cross_entropy(
            input, weight, target, linear_bias=bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options,
            chunk_bytes=self.chunk_bytes, z_loss=self.z_loss, softcap=self.softcap,
            return_lse=self.return_lse)


class PlainLinearCrossEntropyLoss(_LinearCrossEntropyForward,
                                  torch.nn.modules.loss._WeightedLoss):
    """torch 2.13's LinearCrossEntropyLoss for a torch without it (e.g. 2.11): the same
    constructor, attributes (linear, num_classes, out_features, ...), state_dict and forward."""

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None,
                 dtype=None, reduction="mean", weight=None, ignore_index=None,
                 label_smoothing=0.0, options=None, chunk_bytes=None, z_loss=0.0, softcap=None,
                 return_lse=False):
        _functional.check_llm_extras(z_loss, softcap, return_lse)
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got "
                               f"{tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError("expected label_smoothing to be in range [0, 1], got "
                               f"{label_smoothing}")
        super().__init__(weight=weight, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes),
                                      bias=bias, device=device, dtype=dtype)
        self.options = options
        self.chunk_bytes = chunk_bytes
        self.z_loss, self.softcap, self.return_lse = z_loss, softcap, return_lse

    def extra_repr(self):
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")


if hasattr(torch.nn, "LinearCrossEntropyLoss"):
    class LinearCrossEntropyLoss(_LinearCrossEntropyForward, torch.nn.LinearCrossEntropyLoss):
        """torch.nn.LinearCrossEntropyLoss, fused and chunked (see linear_cross_entropy).
        chunk_bytes: the logits memory per chunk (default DEFAULT_CHUNK_BYTES); z_loss, softcap
        and return_lse: see functional.cross_entropy (forward returns (loss, lse) with
        return_lse=True)."""

        def __init__(self, in_features, num_classes, *, chunk_bytes=None, z_loss=0.0,
                     softcap=None, return_lse=False, **kwargs):
            _functional.check_llm_extras(z_loss, softcap, return_lse)
            super().__init__(in_features, num_classes, **kwargs)
            self.chunk_bytes = chunk_bytes
            self.z_loss, self.softcap, self.return_lse = z_loss, softcap, return_lse
else:
    LinearCrossEntropyLoss = PlainLinearCrossEntropyLoss
