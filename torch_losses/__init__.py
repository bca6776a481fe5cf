"""torch_losses: fused C++/CUDA loss kernels, drop-in for torch.nn's losses."""
from ._version_check import load_extension

# First: a clear ImportError (wrong torch, no compiled extension) instead of a loader error or a
# circular-import message from the modules below.
load_extension()

import torch  # noqa: E402

from . import functional  # noqa: E402
from ._autograd import (  # noqa: E402
    BCEFunction,
    BCEWithLogitsFunction,
    CrossEntropyFunction,
    HingeFunction,
    HuberFunction,
    KLDivFunction,
    L1Function,
    MSEFunction,
    SmoothL1Function,
)
from .linear import LinearCrossEntropyFunction, LinearCrossEntropyLoss  # noqa: E402
from .modules import (  # noqa: E402
    BCELoss,
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    HingeLoss,
    HuberLoss,
    KLDivLoss,
    L1Loss,
    MSELoss,
    SmoothL1Loss,
)

from ._version_check import TESTED_TORCH_RANGE, UntestedTorchWarning  # noqa: E402

__version__ = "0.1.0"


def empty_cpu_cache():
    """Hands the CPU output cache's blocks back to the system; returns how many bytes.

    Large CPU gradients (>= 1 MiB) come from blocks that earlier outputs released, so that a
    training loop's gradient of the same size every step reuses memory whose pages are already
    mapped, instead of faulting fresh ones in. Like torch.cuda's caching allocator, the cache
    holds released blocks (at most TORCH_LOSSES_CPU_CACHE_MB MiB, default 1024; 0 turns it off).
    """
    return torch.ops.torch_losses.empty_cpu_cache()


def cpu_cache_bytes():
    """The bytes the CPU output cache holds now (see empty_cpu_cache)."""
    return torch.ops.torch_losses.cpu_cache_bytes()


__all__ = [
    "functional", "TESTED_TORCH_RANGE", "UntestedTorchWarning",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "HuberLoss", "MSELoss", "L1Loss", "SmoothL1Loss",
    "BCELoss", "KLDivLoss", "HingeLoss",
    "LinearCrossEntropyLoss", "LinearCrossEntropyFunction",
    "CrossEntropyFunction", "BCEWithLogitsFunction", "HuberFunction", "MSEFunction",
    "L1Function", "SmoothL1Function", "BCEFunction", "KLDivFunction", "HingeFunction",
    "empty_cpu_cache", "cpu_cache_bytes",
]
