"""Loss modules: hold the options (and class weights), call minidl.ops.loss in forward.

Class weights are registered as buffers, so `.to("gpu")` moves them with the model and
they appear in state_dict, as in torch.
"""
from .. import backend
from ..ops import loss as L
from ..tensor import Tensor
from .module import Module


def _weight_buffer(module, name, weight):
    if isinstance(weight, Tensor):
        weight = weight.data
    if weight is not None and not hasattr(weight, "dtype"):
        weight = backend.to_numpy(weight).astype("float32")
    module.register_buffer(name, weight)


class CrossEntropyLoss(Module):
    """Softmax cross-entropy; see minidl.functional.cross_entropy.

    forward(input (N, C, ...), target (N, ...) ints, pixel_weight=None (N, ...)).
    """
    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        super().__init__()
        L._check_reduction("CrossEntropyLoss", reduction)
        _weight_buffer(self, "weight", weight)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing = label_smoothing

    def forward(self, input, target, pixel_weight=None):
        return L.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, pixel_weight=pixel_weight,
                               label_smoothing=self.label_smoothing)


class NLLLoss(Module):
    def __init__(self, weight=None, ignore_index=-100, reduction="mean"):
        super().__init__()
        L._check_reduction("NLLLoss", reduction)
        _weight_buffer(self, "weight", weight)
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, input, target):
        return L.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class BCEWithLogitsLoss(Module):
    """Sigmoid + binary cross-entropy; see minidl.functional.binary_cross_entropy_with_logits."""
    def __init__(self, weight=None, reduction="mean", pos_weight=None):
        super().__init__()
        L._check_reduction("BCEWithLogitsLoss", reduction)
        _weight_buffer(self, "weight", weight)
        _weight_buffer(self, "pos_weight", pos_weight)
        self.reduction = reduction

    def forward(self, input, target):
        return L.binary_cross_entropy_with_logits(input, target, self.weight,
                                                  reduction=self.reduction, pos_weight=self.pos_weight)


class MSELoss(Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        L._check_reduction("MSELoss", reduction)
        self.reduction = reduction

    def forward(self, input, target):
        return L.mse_loss(input, target, reduction=self.reduction)


class KLDivLoss(Module):
    def __init__(self, reduction="mean", log_target=False):
        super().__init__()
        L._check_reduction("KLDivLoss", reduction, L._REDUCTIONS + ("batchmean",))
        self.reduction, self.log_target = reduction, log_target

    def forward(self, input, target):
        return L.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class BCELoss(Module):
    """Binary cross-entropy of probabilities; see minidl.functional.binary_cross_entropy."""
    def __init__(self, weight=None, reduction="mean"):
        super().__init__()
        L._check_reduction("BCELoss", reduction)
        _weight_buffer(self, "weight", weight)
        self.reduction = reduction

    def forward(self, input, target):
        return L.binary_cross_entropy(input, target, self.weight, reduction=self.reduction)


class L1Loss(Module):
    def __init__(self, reduction="mean"):
        super().__init__()
        L._check_reduction("L1Loss", reduction)
        self.reduction = reduction

    def forward(self, input, target):
        return L.l1_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(Module):
    def __init__(self, reduction="mean", beta=1.0):
        super().__init__()
        L._check_reduction("SmoothL1Loss", reduction)
        self.reduction, self.beta = reduction, beta

    def forward(self, input, target):
        return L.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)
