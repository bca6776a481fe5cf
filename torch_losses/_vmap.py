"""vmap rules of the torch_losses ops (torch.func.vmap, and the Functions' generated vmap rules
that per-sample gradients use).

A batched call runs the op once per batch entry and stacks the results: the ops reduce over all
of their input (mean/sum) and take fixed layouts ((N, C, D) for cross-entropy), so one call over
the stacked batch would mix the samples. Per-sample gradients are a small part of a model's
work; the loop keeps each entry's numbers identical to an unbatched call.
"""
import torch

_OPS = ["cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_fwd_inplace"] + [
    f"{name}_{direction}"
    for name in ("bce_with_logits", "huber", "mse", "l1", "smooth_l1", "bce", "hinge", "kl_div")
    for direction in ("fwd", "bwd")
]


def _entry(arg, dim, i):
    return arg.select(dim, i) if dim is not None else arg


def _loop_rule(op):
    def rule(info, in_dims, *args):
        results = [op(*(_entry(a, d, i) for a, d in zip(args, in_dims)))
                   for i in range(info.batch_size)]
        stacked = tuple(torch.stack(outputs) for outputs in zip(*results))
        return stacked, (0,) * len(stacked)

    return rule


def _scale_grad_rule(info, in_dims, grad, grad_output):
    """scale_grad_ mutates grad in place: each entry's view is scaled by its grad_output."""
    grad_dim, out_dim = in_dims
    for i in range(info.batch_size):
        torch.ops.torch_losses.scale_grad_(_entry(grad, grad_dim, i),
                                           _entry(grad_output, out_dim, i))
    return None, None


for _name in _OPS:
    torch.library.register_vmap(f"torch_losses::{_name}",
                                _loop_rule(getattr(torch.ops.torch_losses, _name).default))
torch.library.register_vmap("torch_losses::scale_grad_", _scale_grad_rule)
