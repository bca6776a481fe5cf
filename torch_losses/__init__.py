"""torch_losses: fused C++/CUDA loss kernels, drop-in for torch.nn's losses."""
from ._version_check import load_extension

# First: a clear ImportError (wrong torch, no compiled extension) instead of a loader error or a
# circular-import message from the modules below.
load_extension()

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

__all__ = [
    "functional", "TESTED_TORCH_RANGE", "UntestedTorchWarning",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "HuberLoss", "MSELoss", "L1Loss", "SmoothL1Loss",
    "BCELoss", "KLDivLoss", "HingeLoss",
    "LinearCrossEntropyLoss", "LinearCrossEntropyFunction",
    "CrossEntropyFunction", "BCEWithLogitsFunction", "HuberFunction", "MSEFunction",
    "L1Function", "SmoothL1Function", "BCEFunction", "KLDivFunction", "HingeFunction",
]
