"""Vocabulary-parallel cross-entropy over torch.distributed (tensor parallelism of the LM head).

Each rank of `group` holds the logits of a contiguous slice of the vocabulary, logits_shard
(..., V_local) for classes [vocab_start, vocab_start + V_local). The result equals
torch.nn.functional.cross_entropy of the concatenated logits, value and gradient, without the
full logits on any rank:

1. op vocab_parallel_ce_stats reads the shard once: per row its max, sum of exp relative to it,
   the target's logit where this shard holds the target, and the weighted sums that label
   smoothing and probability targets need (csrc/losses/vocab_parallel.h).
2. all-reduce MAX of 3 N float64: the row maxima, and the max of the target and of minus the
   target (so that targets that differ between ranks, e.g. out of bounds on one rank, raise on
   every rank rather than giving a wrong loss).
3. every sum is moved to the global max; all-reduce SUM of 8 N + 1 floats (the accumulation
   dtype; the last: the shard sizes, giving the vocabulary size).
4. op vocab_parallel_ce_grad: the per-row loss from the sums alone (the same on every rank) and
   the shard's gradient, written in the forward; backward only scales it by grad_output.

So two all-reduces of O(N) floats per call, on the current stream, no host synchronization.
When vocab_start is not given it is derived once per (group, V_local) from an all-gather of the
shard sizes (cached: every rank of the group must then keep its shard size).

Class weights are the full (V) vector, replicated (as torch's weight=). z_loss adds
z_loss * lse^2 per counted row (not class-weighted; same 'mean' denominator); softcap replaces
the logits by softcap * tanh(logits / softcap) before the softmax.

torch_losses.functional.cross_entropy routes a DTensor input sharded on the class dimension
(1-D device mesh) here: see dtensor_cross_entropy.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import Function

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "dtensor_cross_entropy"]

ops = torch.ops.torch_losses
_REDUCTIONS = ("none", "mean", "sum")

# Column layout of csrc/losses/vocab_parallel.h.
_LOCAL_MAX, _LOCAL_SUMS = 0, slice(1, 9)
_SUM_EXP, _TARGET_GAP, _TARGET_WEIGHT, _PROB_WEIGHT, _PROB_SHIFT, _CLASS_WEIGHT, \
    _CLASS_SHIFT, _OWNED = range(8)
_SUM_COLUMNS = 8
# In the summed payload: the columns shifted by (M - m) and the weights that multiply it.
_SHIFTED, _SHIFT_WEIGHTS = [_TARGET_GAP, _PROB_SHIFT, _CLASS_SHIFT], [_OWNED, _PROB_WEIGHT,
                                                                        _CLASS_WEIGHT]

_VOCAB_STARTS = {}


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Group:
    """The process group (None: the default one; no initialized default: a single process)."""

    def __init__(self, group):
        self.active = group is not None or (dist.is_available() and dist.is_initialized())
        self.group = group
        self.size = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0

    def all_reduce(self, tensor, op):
        if self.active and self.size > 1:
            dist.all_reduce(tensor, op=op, group=self.group)

    def vocab_start(self, local_size, device):
        """This rank's first class, from an all-gather of the shard sizes (once per group and
        local size: a host synchronization)."""
        if self.size == 1:
            return 0
        key = (self.group if self.group is not None else dist.group.WORLD, local_size)
        if key not in _VOCAB_STARTS:
            mine = torch.tensor([local_size], dtype=torch.int64, device=device)
            sizes = [torch.empty_like(mine) for _ in range(self.size)]
            dist.all_gather(sizes, mine, group=self.group)
            _VOCAB_STARTS[key] = sum(int(s) for s in sizes[:self.rank])
        return _VOCAB_STARTS[key]


def _global_statistics(local, target, probs, group, local_classes):
    """The two all-reduces: (maxima (3, N) float64, row_sums (N, 8), vocab_size (0-dim)).
    maxima holds the row max of the logits and, for class indices, the max of the target and
    of minus the target over the ranks: the grad op raises on every rank where they differ."""
    maxima = torch.zeros((3, local.shape[0]), dtype=torch.float64, device=local.device)
    maxima[0] = local[:, _LOCAL_MAX]
    if not probs:
        maxima[1] = target
        maxima[2] = -maxima[1]
    group.all_reduce(maxima, dist.ReduceOp.MAX)
    row_max = maxima[0].to(local.dtype)
    # delta = M - m, 0 where they are equal (also both -inf)
    delta = torch.where(local[:, _LOCAL_MAX] == row_max, 0.0, row_max - local[:, _LOCAL_MAX])
    payload = local.new_empty((local.shape[0] * _SUM_COLUMNS + 1,))
    sums = payload[:-1].view(-1, _SUM_COLUMNS)
    sums.copy_(local[:, _LOCAL_SUMS])
    sums[:, _SUM_EXP] *= torch.exp(-delta)
    weights = sums[:, _SHIFT_WEIGHTS]
    moves = torch.where(weights != 0, delta.unsqueeze(1) * weights, 0.0)
    sums[:, _SHIFTED] += moves
    payload[-1] = local_classes
    group.all_reduce(payload, dist.ReduceOp.SUM)
    return maxima, sums, payload[-1]


def _mean_factor(sums, probs, reduction):
    """What the summed loss and the gradients are multiplied by, 0-dim float64: 1, or for
    'mean' 1 / torch's denominator, the number of rows (probabilities) or the weight sum of the
    counted targets; a zero denominator gives nan, as torch's 0 / 0."""
    if reduction != "mean":
        return sums.new_ones((), dtype=torch.float64)
    if probs:
        denominator = sums.new_full((), sums.shape[0], dtype=torch.float64)
    else:
        denominator = sums[:, _TARGET_WEIGHT].sum(dtype=torch.float64)
    return torch.where(denominator == 0, torch.nan, 1.0 / denominator)


def _reduce(row_loss, reduction, factor, dtype, batch_shape):
    if reduction == "none":
        return row_loss.to(dtype).reshape(batch_shape)
    total = row_loss.sum(dtype=torch.float64)
    if reduction == "mean":
        total = total * factor
    return total.to(dtype)


class _Shard:
    """The checked, flattened arguments of one call."""

    def __init__(self, logits_shard, target, weight, group, vocab_start, ignore_index,
                 label_smoothing, reduction, z_loss, softcap):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{reduction} is not a valid value for reduction")
        if label_smoothing > 1.0:
            raise RuntimeError(
                f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be positive or None, got {softcap}")
        if not logits_shard.is_floating_point() or logits_shard.dim() == 0:
            raise ValueError("vocab_parallel_cross_entropy: floating point logits (..., V_local) "
                             f"expected, got {logits_shard.dtype} of shape "
                             f"{list(logits_shard.shape)}")
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
        if logits_shard.device.type == "cuda" and not has_kernel(
                "torch_losses::vocab_parallel_ce_stats", "CUDA"):
            raise NotImplementedError(
                "torch_losses: this build has no CUDA kernels (the extension was built without "
                f"CUDA): vocab-parallel cross-entropy of logits on {logits_shard.device} is not "
                "available")
        self.group = _Group(group)
        self.local_classes = logits_shard.shape[-1]
        self.batch_shape = logits_shard.shape[:-1]
        self.probs = target.shape == logits_shard.shape and target.is_floating_point()
        if self.probs:
            if target.dtype != logits_shard.dtype:
                raise RuntimeError(f"vocab_parallel_cross_entropy: probability targets of "
                                   f"{logits_shard.dtype} expected, got {target.dtype}")
            if ignore_index >= 0:
                raise RuntimeError("ignore_index is not supported for floating point target")
        elif target.dtype != torch.long or target.shape != self.batch_shape:
            raise RuntimeError(
                f"vocab_parallel_cross_entropy: expected an int64 target of shape "
                f"{list(self.batch_shape)} or probabilities of shape "
                f"{list(logits_shard.shape)}, got {target.dtype} of shape {list(target.shape)}")
        if vocab_start is None:
            vocab_start = self.group.vocab_start(self.local_classes, logits_shard.device)
        self.vocab_start = int(vocab_start)
        self.weight = None
        if weight is not None:
            if weight.dim() != 1 or weight.numel() < self.vocab_start + self.local_classes:
                raise RuntimeError(
                    f"vocab_parallel_cross_entropy: weight must hold the whole vocabulary's "
                    f"class weights, got shape {list(weight.shape)} for a shard "
                    f"[{self.vocab_start}, {self.vocab_start + self.local_classes})")
            if weight.requires_grad and torch.is_grad_enabled():
                raise NotImplementedError(
                    "vocab_parallel_cross_entropy: not differentiable with respect to weight")
            self.weight = weight.detach()[
                self.vocab_start:self.vocab_start + self.local_classes].to(
                    _acc_dtype(logits_shard.dtype)).contiguous()
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.z_loss = float(z_loss)
        self.softcap = 0.0 if softcap is None else float(softcap)

    def rows(self, tensor):
        """(N, V_local) or (N) view of a (..., V_local) or (...) tensor."""
        rows = self.batch_shape.numel()
        if tensor.shape == self.batch_shape:
            return tensor.reshape(rows)
        return tensor.reshape(rows, self.local_classes)

    def statistics(self, logits, target):
        """Pass 1 and the two all-reduces."""
        local = ops.vocab_parallel_ce_stats(logits, target, self.weight, self.vocab_start,
                                            self.ignore_index, self.label_smoothing,
                                            self.softcap)
        return _global_statistics(local, target, self.probs, self.group, self.local_classes)

    def grad(self, logits, target, stats, scale, input_grad, target_grad):
        maxima, sums, vocab_size = stats
        return ops.vocab_parallel_ce_grad(
            logits, target, self.weight, maxima, sums, vocab_size, scale.to(sums.dtype),
            self.vocab_start, self.ignore_index, self.label_smoothing, self.z_loss, self.softcap,
            input_grad, target_grad)


def _scale_(grad, grad_output, per_row):
    """grad *= grad_output in place; per_row: grad_output (...) scales the rows of grad
    (..., V_local)."""
    if per_row:
        grad.mul_(grad_output.unsqueeze(-1).to(grad.dtype))
    else:
        ops.scale_grad_(grad, grad_output)
    return grad


class VocabParallelCrossEntropyFunction(Function):
    """Forward: statistics, two all-reduces, loss and the shard's gradient for grad_output = 1.
    Backward: that gradient scaled by grad_output (per row for 'none'); a second backward
    through a retained graph recomputes it from the saved statistics (no collective)."""

    @staticmethod
    def forward(ctx, logits_shard, target, shard):
        logits = shard.rows(logits_shard)
        target_rows = shard.rows(target)
        input_grad = ctx.needs_input_grad[0]
        target_grad = ctx.needs_input_grad[1] and shard.probs
        stats = shard.statistics(logits, target_rows)
        factor = _mean_factor(stats[1], shard.probs, shard.reduction)
        row_loss, grad_input, grad_target = shard.grad(logits, target_rows, stats, factor,
                                                       input_grad, target_grad)
        ctx.shard = shard
        ctx.shapes = (logits_shard.shape, target.shape)
        ctx.grads = [grad_input.view(logits_shard.shape) if input_grad else None,
                     grad_target.view(target.shape) if target_grad else None]
        ctx.save_for_backward(logits, target_rows, factor, *stats)
        ctx.set_materialize_grads(False)
        return _reduce(row_loss, shard.reduction, factor, logits_shard.dtype, shard.batch_shape)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:
            return None, None, None
        shard = ctx.shard
        grad_input, grad_target = ctx.grads
        ctx.grads = [None, None]  # AccumulateGrad adopts the buffers; a second backward recomputes
        input_grad = ctx.needs_input_grad[0]
        target_grad = ctx.needs_input_grad[1] and shard.probs
        if (input_grad and grad_input is None) or (target_grad and grad_target is None):
            logits, target_rows, scale, *stats = ctx.saved_tensors
            _, gx, gt = shard.grad(logits, target_rows, stats, scale, input_grad, target_grad)
            grad_input = gx.view(ctx.shapes[0]) if input_grad else None
            grad_target = gt.view(ctx.shapes[1]) if target_grad else None
        per_row = shard.reduction == "none"
        if grad_input is not None:
            grad_input = _scale_(grad_input, grad_output, per_row)
        if grad_target is not None:
            grad_target = _scale_(grad_target, grad_output, per_row)
        return grad_input, grad_target, None


def vocab_parallel_cross_entropy(logits_shard, target, *, group=None, vocab_start=None,
                                 weight=None, ignore_index=-100, label_smoothing=0.0,
                                 reduction="mean", z_loss=0.0, softcap=None):
    """Cross-entropy of logits sharded over the vocabulary across `group`.

    logits_shard: (..., V_local), this rank's classes [vocab_start, vocab_start + V_local)
        (the class dimension is the LAST one; shards may be uneven).
    target: (...) int64 global class indices (the same on every rank), or this rank's
        (..., V_local) slice of class probabilities.
    vocab_start: this rank's first class; None derives it once from the shard sizes.
    weight: the whole vocabulary's (V) class weights (replicated), or None.
    Returns what torch.nn.functional.cross_entropy returns for the concatenated logits (the
    same value on every rank), plus z_loss * lse^2 per counted row and with logits
    softcap * tanh(logits / softcap) where asked. Gradients flow to logits_shard (and to
    probability targets).
    """
    shard = _Shard(logits_shard, target, weight, group, vocab_start, ignore_index,
                   label_smoothing, reduction, z_loss, softcap)
    if not torch.is_grad_enabled():
        logits_shard, target = logits_shard.detach(), target.detach()
    return VocabParallelCrossEntropyFunction.apply(logits_shard, target, shard)



class VocabParallelLinearCrossEntropyFunction(Function):
    """A column-parallel LM head and the loss: input (N, H) (the same on every rank),
    weight_shard (V_local, H), bias_shard (V_local) or None, target (N) class indices or this
    shard's (N, V_local) probabilities (differentiable). The rows
    go through in chunks (torch_losses/linear.py's design): per chunk the shard's logits, the
    statistics and their two all-reduces, the logits' gradient written over nothing but a chunk
    buffer, and at once grad_input[chunk] (this shard's part), grad_weight_shard and
    grad_bias_shard. grad_input is all-reduced once at the end. Backward scales the gradients
    by grad_output; for 'none' (a per-row grad_output) it recomputes the chunks from the saved
    statistics (no collective but the final grad_input all-reduce)."""

    @staticmethod
    def forward(ctx, input, weight_shard, bias_shard, target, shard, rows_per_chunk):
        wants = tuple(ctx.needs_input_grad[:3]) + (ctx.needs_input_grad[3] and shard.probs,)
        scale, factor = _linear_mean_factor(target, shard, input.dtype)
        live = shard.reduction != "none" and any(wants)
        row_loss, stats, grads = _linear_chunks(input, weight_shard, bias_shard, target, shard,
                                                rows_per_chunk, scale, wants if live else
                                                (False,) * 4)
        ctx.shard, ctx.rows_per_chunk, ctx.wants = shard, rows_per_chunk, wants
        ctx.grads = grads if live else None
        ctx.stats = stats
        ctx.save_for_backward(input, weight_shard, bias_shard, target, scale)
        ctx.set_materialize_grads(False)
        return _reduce(row_loss, shard.reduction, factor, input.dtype, shard.batch_shape)

    @staticmethod
    def backward(ctx, grad_output):
        if grad_output is None:
            return (None,) * 6
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # 'none', or a second backward: recompute with grad_output folded in
            input, weight_shard, bias_shard, target, scale = ctx.saved_tensors
            row_scale = grad_output.reshape(-1) if grad_output.dim() else None
            if row_scale is None:
                scale = scale * grad_output
            _, _, grads = _linear_chunks(input, weight_shard, bias_shard, target, ctx.shard,
                                         ctx.rows_per_chunk, scale, ctx.wants, ctx.stats,
                                         row_scale)
        else:
            for grad in grads:
                if grad is not None:
                    ops.scale_grad_(grad, grad_output)
        return (*grads, None, None)


def _linear_mean_factor(target, shard, dtype):
    """(gradient scale in the accumulation dtype, 'mean' factor in float64), known before any
    chunk: the denominator is the number of rows (probabilities) or the weight sum of the
    counted targets (class weights are replicated), computed locally."""
    if shard.reduction != "mean" or shard.probs:
        denominator = target.shape[0] if shard.reduction == "mean" else 1
        factor = torch.full((), 1.0 / denominator if denominator else torch.nan,
                            dtype=torch.float64, device=target.device)
        return factor.to(_acc_dtype(dtype)), factor
    kept = target != shard.ignore_index
    if shard.full_weight is None:
        denominator = kept.sum(dtype=torch.float64)
    else:
        safe = torch.where(kept, target, 0).clamp(0, shard.full_weight.numel() - 1)
        denominator = torch.where(kept, shard.full_weight.double()[safe], 0.0).sum()
    factor = torch.where(denominator == 0, torch.nan, 1.0 / denominator)
    return factor.to(_acc_dtype(dtype)), factor


def _linear_chunks(input, weight_shard, bias_shard, target, shard, rows_per_chunk, scale,
                   wants, stats=None, row_scale=None):
    """The chunk loop. Without `stats` (the forward) each chunk's statistics are all-reduced
    and kept; with them (a recompute) no statistic is communicated. row_scale (N) multiplies
    the logits' gradient per row. Returns (row_loss, stats, [grad_input, grad_weight_shard,
    grad_bias_shard, grad_target] (None where not wanted))."""
    n = input.shape[0]
    acc = _acc_dtype(input.dtype)
    row_loss = input.new_empty((n,), dtype=acc)
    grad_input = torch.zeros_like(input) if wants[0] else None
    grad_weight = torch.zeros_like(weight_shard, dtype=acc) if wants[1] else None
    grad_bias = torch.zeros_like(bias_shard, dtype=acc) if wants[2] else None
    grad_target = torch.empty_like(target) if wants[3] else None
    logits_grad = any(wants[:3])
    forward = stats is None
    if forward:
        stats = []
    for index, start in enumerate(range(0, n, rows_per_chunk)):
        rows = slice(start, min(n, start + rows_per_chunk))
        x, t = input[rows], target[rows]
        logits = F.linear(x, weight_shard, bias_shard)
        if forward:
            stats.append(shard.statistics(logits, t))
        loss, grad, grad_t = shard.grad(logits, t, stats[index], scale, logits_grad, wants[3])
        row_loss[rows] = loss
        if grad_target is not None:
            if row_scale is not None:
                grad_t.mul_(row_scale[rows].unsqueeze(1).to(grad_t.dtype))
            grad_target[rows] = grad_t
        if not logits_grad:
            continue
        if row_scale is not None:
            grad.mul_(row_scale[rows].unsqueeze(1).to(grad.dtype))
        if grad_input is not None:
            torch.mm(grad, weight_shard, out=grad_input[rows])
        if grad_weight is not None:
            grad_weight.addmm_(grad.t().to(acc), x.to(acc))
        if grad_bias is not None:
            grad_bias.add_(grad.sum(0, dtype=acc))
        del logits, grad  # one chunk of logits alive at a time
    if grad_input is not None:
        shard.group.all_reduce(grad_input, dist.ReduceOp.SUM)  # the shards' parts: once
    grads = [grad_input, None if grad_weight is None else grad_weight.to(weight_shard.dtype),
             None if grad_bias is None else grad_bias.to(bias_shard.dtype), grad_target]
    return row_loss, stats, grads


def vocab_parallel_linear_cross_entropy(input, weight_shard, target, *, bias_shard=None,
                                        group=None, vocab_start=None, weight=None,
                                        ignore_index=-100, label_smoothing=0.0,
                                        reduction="mean", z_loss=0.0, softcap=None,
                                        chunk_bytes=None, rows_per_chunk=None):
    """cross_entropy(input @ W.T + b, target) for a column-parallel LM head: this rank holds
    the rows [vocab_start, vocab_start + V_local) of W (V, H) as weight_shard (V_local, H) and
    of b as bias_shard. input (..., H) and target (...) class indices are the same on every
    rank; probability targets are this rank's (..., V_local) slice. The logits exist one
    chunk of rows at a time; per chunk two all-reduces of O(rows) floats, and one all-reduce of
    grad_input (N, H) at the end. Every rank must run the same
    chunks: rows_per_chunk (equal on every rank) sets them; without it each rank sizes them
    from chunk_bytes (default as torch_losses.linear) and its shard, and one MIN all-reduce of
    one integer (a host synchronization) agrees on the smallest. Other arguments as
    vocab_parallel_cross_entropy."""
    from .linear import chunk_rows

    if weight_shard.dim() != 2 or weight_shard.shape[1] != input.shape[-1]:
        raise RuntimeError(f"vocab_parallel_linear_cross_entropy: weight_shard (V_local, "
                           f"{input.shape[-1]}) expected, got {list(weight_shard.shape)}")
    like = input.new_empty(()).expand(*input.shape[:-1], weight_shard.shape[0])
    shard = _Shard(like, target, weight, group, vocab_start, ignore_index, label_smoothing,
                   reduction, z_loss, softcap)
    shard.full_weight = None if weight is None else weight.detach()
    rows = rows_per_chunk
    if rows is None:
        rows = chunk_rows(weight_shard.shape[0], 2 * input.element_size(), input.device,
                          chunk_bytes)
        if shard.group.size > 1:
            agreed = torch.tensor(rows, device=input.device)
            shard.group.all_reduce(agreed, dist.ReduceOp.MIN)
            rows = int(agreed)
    if not torch.is_grad_enabled():
        input, weight_shard, target = input.detach(), weight_shard.detach(), target.detach()
        bias_shard = None if bias_shard is None else bias_shard.detach()
    return VocabParallelLinearCrossEntropyFunction.apply(
        input.reshape(-1, input.shape[-1]), weight_shard, bias_shard, shard.rows(target),
        shard, rows)


def _is_dtensor(tensor):
    return type(tensor).__module__.startswith("torch.distributed.tensor")


class _LocalShard(Function):
    """DTensor.to_local() whose gradient comes back with the DTensor's own placements, shape and
    stride. torch 2.11's to_local derives the gradient's global stride from the local shard,
    which is not the DTensor's where the shards are uneven (7 classes on 2 ranks); AccumulateGrad
    then re-lays the gradient out as a replicated DTensor: an all-gather of the whole gradient."""

    @staticmethod
    def forward(ctx, dtensor):
        ctx.layout = (dtensor.device_mesh, dtensor.placements, dtensor.shape, dtensor.stride())
        return dtensor.to_local()

    @staticmethod
    def backward(ctx, grad):
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = ctx.layout
        return DTensor.from_local(grad, mesh, placements, run_check=False, shape=shape,
                                  stride=stride)


def dtensor_cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, z_loss=0.0, softcap=None):
    """torch.nn.functional.cross_entropy of a DTensor `input` sharded on the class dimension
    (dim 1, or 0 for a single sample) along exactly one mesh dimension (the tensor-parallel
    one): the vocab-parallel kernels on each rank's shard, inside or outside torch's
    loss_parallel(). Other mesh dimensions may shard other tensor dims (e.g. the batch) or
    replicate, as in loss_parallel(). target: class indices (a plain tensor where every other
    mesh dim replicates, else a DTensor placed as loss_parallel() derives) or probabilities
    (sharded like input, or replicated / plain on a 1-D mesh and sliced here); weight: the full
    class weights. Result placements as loss_parallel(): Replicate on the tensor-parallel dim;
    on a batch-sharded dim Shard for 'none', Partial for 'sum' ('mean' needs a 1-D mesh).
    Gradients flow back to input as a DTensor of its placements."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh, placements = input.device_mesh, tuple(input.placements)
    class_dim = 0 if input.dim() == 1 else 1
    tp_dims = [i for i, p in enumerate(placements) if p.is_shard(class_dim)]
    others_ok = all(p.is_shard() or p.is_replicate() for p in placements)
    if len(tp_dims) != 1 or not others_ok:
        raise NotImplementedError(
            f"torch_losses: cross_entropy of a DTensor needs input sharded on the class "
            f"dimension ({class_dim}) along exactly one mesh dim, the others Shard or Replicate; "
            f"got placements {placements}")
    tp = tp_dims[0]
    batch_sharded = [i for i, p in enumerate(placements) if i != tp and p.is_shard()]
    if batch_sharded and reduction == "mean":
        raise NotImplementedError(
            "torch_losses: reduction='mean' of a DTensor needs a mesh whose other dims "
            "replicate (as torch's loss_parallel()); use 'sum' or 'none' and divide by the "
            "global count")
    group = mesh.get_group(tp)
    rank, world = mesh.get_local_rank(tp), mesh.size(tp)
    logits = _LocalShard.apply(input)
    vocab = input.shape[class_dim]
    # DTensor's Shard splits as torch.chunk does: ceil(V / P) classes per rank, the last fewer
    chunk = -(-vocab // world)
    vocab_start = min(rank * chunk, vocab)
    if logits.shape[class_dim] != min(chunk, vocab - vocab_start):
        vocab_start = None  # another split: derived from the shard sizes
    probs = target.is_floating_point()
    if _is_dtensor(target):
        local_target = ((probs and tuple(target.placements) == placements) or
                        (not probs and target.placements[tp].is_replicate() and batch_sharded))
        target = _LocalShard.apply(target) if local_target else target.full_tensor()
    elif batch_sharded:
        raise RuntimeError("torch_losses: with input sharded over other mesh dims too, target "
                           "must be a DTensor placed as torch's loss_parallel() derives")
    if probs and target.shape[class_dim] == vocab and logits.shape[class_dim] != vocab:
        start = vocab_start
        if start is None:  # the shard sizes are gathered once, then cached
            start = _Group(group).vocab_start(logits.shape[class_dim], logits.device)
        target = target.narrow(class_dim, start, logits.shape[class_dim])
    if weight is not None and _is_dtensor(weight):
        weight = weight.full_tensor()
    loss = vocab_parallel_cross_entropy(
        logits.movedim(class_dim, -1), target.movedim(class_dim, -1) if probs else target,
        group=group, vocab_start=vocab_start, weight=weight, ignore_index=ignore_index,
        label_smoothing=label_smoothing, reduction=reduction, z_loss=z_loss, softcap=softcap)
    out = []
    for i, p in enumerate(placements):
        if i == tp or p.is_replicate():
            out.append(Replicate())
        elif reduction == "sum":
            out.append(Partial("sum"))
        else:  # 'none': the loss has no class dim
            out.append(Shard(p.dim if p.dim < class_dim else p.dim - 1))
    if reduction != "none":
        return DTensor.from_local(loss, mesh, out, run_check=False)
    shape = input.shape[:class_dim] + input.shape[class_dim + 1:]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(loss, mesh, out, run_check=False, shape=shape, stride=stride)
