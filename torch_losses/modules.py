"""nn.Module losses. Each subclasses torch's own module, so constructor arguments, defaults,
deprecated size_average/reduce, weight/pos_weight buffers, repr and state_dict are torch's;
only forward runs the fused kernels."""
import torch
from torch.nn.modules.loss import _Loss

from . import functional as F

__all__ = [
    "CrossEntropyLoss",
    "BCEWithLogitsLoss",
    "HuberLoss",
    "MSELoss",
    "L1Loss",
    "SmoothL1Loss",
    "BCELoss",
    "KLDivLoss",
    "HingeLoss",
]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss, fused. Keyword-only extras (see functional.cross_entropy):
    inplace_backward, z_loss, softcap, and return_lse=True, with which forward returns
    (loss, lse)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, inplace_backward=False, z_loss=0.0,
                 softcap=None, return_lse=False):
        F.check_llm_extras(z_loss, softcap, return_lse)
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward
        self.z_loss = z_loss
        self.softcap = softcap
        self.return_lse = return_lse

    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               inplace_backward=self.inplace_backward, z_loss=self.z_loss,
                               softcap=self.softcap, return_lse=self.return_lse)

    def extra_repr(self):
        extras = [f"{k}={getattr(self, k)}" for k, off in
                  (("z_loss", 0.0), ("softcap", None), ("return_lse", False))
                  if getattr(self, k) != off]
        return ", ".join(extras)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """torch.nn.BCEWithLogitsLoss, fused."""

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight,
                                                  pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class HuberLoss(torch.nn.HuberLoss):
    """torch.nn.HuberLoss, fused."""

    def forward(self, input, target):
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class MSELoss(torch.nn.MSELoss):
    """torch.nn.MSELoss, fused."""

    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)


class L1Loss(torch.nn.L1Loss):
    """torch.nn.L1Loss, fused."""

    def forward(self, input, target):
        return F.l1_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(torch.nn.SmoothL1Loss):
    """torch.nn.SmoothL1Loss, fused."""

    def forward(self, input, target):
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class BCELoss(torch.nn.BCELoss):
    """torch.nn.BCELoss, fused."""

    def forward(self, input, target):
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class KLDivLoss(torch.nn.KLDivLoss):
    """torch.nn.KLDivLoss, fused."""

    def forward(self, input, target):
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class HingeLoss(_Loss):
    """Binary SVM hinge loss max(0, margin - y * x), y in {-1, +1}; see functional.hinge_loss."""

    __constants__ = ["margin", "reduction"]

    def __init__(self, margin=1.0, reduction="mean"):
        super().__init__(reduction=reduction)
        self.margin = margin

    def forward(self, input, target):
        return F.hinge_loss(input, target, margin=self.margin, reduction=self.reduction)
