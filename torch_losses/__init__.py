"""torch_losses: fused C++/CUDA loss kernels, drop-in for torch.nn's losses."""
from . import functional
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
)
from .linear import LinearCrossEntropyFunction, LinearCrossEntropyLoss
from .modules import (
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

__version__ = "0.1.0"

__all__ = [
    "functional",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "HuberLoss", "MSELoss", "L1Loss", "SmoothL1Loss",
    "BCELoss", "KLDivLoss", "HingeLoss",
    "LinearCrossEntropyLoss", "LinearCrossEntropyFunction",
    "CrossEntropyFunction", "BCEWithLogitsFunction", "HuberFunction", "MSEFunction",
    "L1Function", "SmoothL1Function", "BCEFunction", "KLDivFunction", "HingeFunction",
]
