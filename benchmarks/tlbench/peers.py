"""The implementations ours is compared with besides torch eager: torch.compile of torch's
loss (one compiled function per loss, reused by every case of that loss) and Liger-Kernel's
cross-entropy when installed."""
import torch

def liger_ce():
    try:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except ImportError:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception:
        return None
    mod = LigerCrossEntropyLoss(reduction="mean")

    def f(x, y):
        out = mod(x, y)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "loss", out)
    return f


_COMPILED = {}


def compiled_baseline(loss, torch_fn):
    """torch.compile of torch's loss, created once per loss: every case of that loss reuses it
    (dynamo compiles one graph per new shape and dtype, dynamic=False, and keeps the others)."""
    if loss not in _COMPILED:
        _COMPILED[loss] = torch.compile(torch_fn, dynamic=False)
    return _COMPILED[loss]


# One graph per (shape, dtype) and per loss: a --sizes run can hold more than dynamo's default 8.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
