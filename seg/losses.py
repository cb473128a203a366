"""Segmentation losses: cross-entropy, the U-Net weight map, soft Dice, and their sums.

Every loss is a callable ``loss(logits, target) -> scalar Tensor`` with

    logits: (N, C, H, W) Tensor of raw scores (no softmax applied)
    target: (N, H, W) integer class ids (ndarray or Tensor), on the logits' device

so the training loop can use any of them the same way; ``get_loss(name)`` builds one by the
name the command line uses ("ce", "weighted_ce", "dice", "ce_dice").

The U-Net weight map (Ronneberger et al. 2015, eq. 2) is

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

w_c balances the class frequencies; d1 and d2 are the distances to the nearest and the
second-nearest object. The second term is large only in thin gaps between two objects, so
the network is pushed to learn the separating background there (touching cells).
"""
import numpy as np
from scipy import ndimage

from minidl import backend
from minidl import functional as F
from minidl.function import Function
from minidl.tensor import Tensor

__all__ = ["unet_weight_map", "weighted_cross_entropy", "SoftDice", "soft_dice_loss",
           "ce_dice_loss", "bce_dice", "CrossEntropyLoss", "WeightedCrossEntropyLoss", "DiceLoss",
           "CEDiceLoss", "get_loss", "LOSSES", "batch_inputs"]


# ----------------------------------------------------------------------------- weight map

def _class_weight_map(mask, class_weights):
    """w_c(x): (H, W) float64 from the per-class weights chosen by `class_weights`."""
    if class_weights is None:
        return np.ones(mask.shape)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced', None or an array of per-class "
                             f"weights, got {class_weights!r}.")
        # Balanced: every class present gets the same total weight, and the mean weight over
        # the image is 1 (weight of class c = pixels / (classes present * pixels of class c)).
        ids, counts = np.unique(mask, return_counts=True)
        table = np.zeros(int(ids.max()) + 1)
        table[ids] = mask.size / (len(ids) * counts)
        return table[mask]
    table = np.asarray(class_weights, dtype=np.float64).ravel()
    if mask.size and mask.max() >= table.size:
        raise ValueError(f"class_weights has {table.size} entries but the mask holds class "
                         f"{int(mask.max())}; give one weight per class.")
    return table[mask]


def unet_weight_map(mask, w0=10.0, sigma=5.0, class_weights="balanced"):
    """The U-Net loss weight map of one label map.

    mask: (H, W) integer class ids, 0 = background. Objects are the connected components
        (4-connectivity) of each foreground class.
    w0, sigma: the border term's height and width in pixels (paper: 10 and 5).
    class_weights: "balanced" (from this mask's class frequencies), None (all 1), or an array
        with one weight per class.
    Returns (H, W) float32. The border term is added on background pixels only, as in the
    paper, and is zero when the mask holds fewer than two objects (there is no second one).
    """
    mask = np.asarray(backend.to_numpy(mask.data if isinstance(mask, Tensor) else mask))
    if mask.ndim != 2:
        raise ValueError(f"unet_weight_map takes one (H, W) label map, got shape {mask.shape}; "
                         "call it once per image.")
    if not np.issubdtype(mask.dtype, np.integer) and mask.dtype != np.bool_:
        raise TypeError(f"mask must hold integer class ids, got dtype {mask.dtype}.")
    mask = mask.astype(np.int64)
    if mask.size and mask.min() < 0:
        raise ValueError(f"mask holds the negative class id {int(mask.min())}; class ids start at 0.")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    weight = _class_weight_map(mask, class_weights)

    # Number the objects: connected components of every foreground class, one id each.
    objects = np.zeros(mask.shape, dtype=np.int64)
    count = 0
    for c in np.unique(mask[mask > 0]):
        labels, n = ndimage.label(mask == c)
        objects[labels > 0] = labels[labels > 0] + count
        count += n
    if count >= 2 and w0 != 0:
        # d1 <= d2 <= (the rest): keep the two smallest distances seen so far, per pixel,
        # instead of stacking one distance map per object (memory stays two maps).
        d1 = np.full(mask.shape, np.inf)
        d2 = np.full(mask.shape, np.inf)
        for i in range(1, count + 1):
            # Distance from every pixel to the nearest pixel of object i (0 on the object).
            d = ndimage.distance_transform_edt(objects != i)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma ** 2))
        weight = weight + np.where(mask == 0, border, 0.0)
    return weight.astype(np.float32)


def unet_weight_maps(target, **options):
    """unet_weight_map for a batch: target (N, H, W) -> (N, H, W) float32 on the target's device."""
    array = target.data if isinstance(target, Tensor) else target
    host = backend.to_numpy(array)
    maps = np.stack([unet_weight_map(m, **options) for m in host])
    return backend.to_device(maps, backend.device_of(array))


# ----------------------------------------------------------------------------- functions

def _target_array(target, logits):
    """Integer target (N, H, W) as a backend array on the logits' device, checked against logits."""
    array = target.data if isinstance(target, Tensor) else target
    if not hasattr(array, "shape"):
        array = np.asarray(array)
    if array.ndim != 3 or tuple(array.shape) != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(f"target shape {tuple(array.shape)} does not match logits shape "
                         f"{tuple(logits.shape)}; the target must be (N, H, W) with the logits' "
                         "N, H and W.")
    if array.dtype.kind not in "iub":
        raise TypeError(f"target must hold integer class ids, got dtype {array.dtype}.")
    return backend.to_device(array, logits.device)


def weighted_cross_entropy(logits, target, weight_map):
    """Pixel-wise softmax cross-entropy weighted by `weight_map` (the U-Net loss).

    logits: (N, C, H, W); target: (N, H, W) class ids; weight_map: (N, H, W) (e.g. from
    unet_weight_map). Returns a scalar Tensor, reduced as F.cross_entropy's pixel_weight does.
    """
    target = _target_array(target, logits)
    w = weight_map.data if isinstance(weight_map, Tensor) else weight_map
    w = backend.to_device(np.asarray(w) if not hasattr(w, "shape") else w, logits.device)
    if tuple(w.shape) != tuple(target.shape):
        raise ValueError(f"weight_map shape {tuple(w.shape)} does not match target shape "
                         f"{tuple(target.shape)}; give one weight per pixel, (N, H, W).")
    return F.cross_entropy(logits, target, pixel_weight=w.astype(logits.dtype, copy=False))


class SoftDice(Function):
    """1 - soft Dice of softmax(x), as one op: x (N, C, H, W) logits -> scalar.

    Params: onehot (N, C, H, W) target (a constant), weights (C,) each class's share of the
    score (0 for classes not scored; they sum to 1), axes (2, 3) per image or (0, 2, 3)
    pooled, smooth. With p = softmax(x) over the classes, per image n (or pooled) and class c:

        I = sum p t,   D = sum p + sum t,   dice = (2 I + s) / (D + s)
        loss = 1 - sum_c weights_c * mean_n dice_nc

    and the gradient, first for p, then through the softmax's Jacobian:

        d loss / d p = -(weights_c / M) * (2 t - dice) / (D + s)     (M images averaged)
        d loss / d x = p * (g - sum_c p g)

    As one op it makes a few passes over (N, C, H, W) instead of the dozen small ops (and
    their graph nodes) of the same formula written with tensors; on the example U-Net's
    4 x 2 x 64 x 88 logits that was most of the loss's time.
    """

    def forward(self, x):
        xp = backend.get_array_module(x)
        e = xp.exp(x - x.max(axis=1, keepdims=True))          # log-sum-exp shift
        p = e / e.sum(axis=1, keepdims=True)
        t = self.onehot
        inter = (p * t).sum(axis=self.axes)
        self.denom = p.sum(axis=self.axes) + t.sum(axis=self.axes) + self.smooth
        self.dice = (2 * inter + self.smooth) / self.denom   # (N, C), or (C,) pooled
        self.p = p
        images = self.dice.shape[0] if self.dice.ndim == 2 else 1
        self.scale = self.weights / images
        return 1 - (self.dice * self.scale).sum()

    def backward(self, gy):
        expand = (slice(None),) * self.dice.ndim + (None, None)
        coef = (-gy * self.scale / self.denom)[expand]           # (N, C, 1, 1) or (C, 1, 1)
        g = coef * (2 * self.onehot - self.dice[expand])
        p = self.p
        return p * (g - (p * g).sum(axis=1, keepdims=True))


def soft_dice_loss(logits, target, include_background=False, class_weights=None, smooth=1.0,
                   per_image=True):
    """1 - soft Dice of the softmax probabilities, averaged over classes (and images).

    logits: (N, C, H, W); target: (N, H, W) class ids.
    include_background: also score class 0 (off by default: background Dice is near 1 and
        says little when the foreground is small).
    class_weights: optional (C,) weights of the classes' Dice terms (normalised to sum 1
        over the scored classes).
    smooth: added to numerator and denominator, so an empty target and an empty prediction
        give Dice 1 (the Kaggle rule) and the gradient stays finite.
    per_image: Dice per image then mean (like the Kaggle metric); False pools the batch.
    Dice_c = (2 sum p_c t_c + smooth) / (sum p_c + sum t_c + smooth); the op is SoftDice.
    """
    num_classes = logits.shape[1]
    first = 0 if include_background else 1
    if num_classes - first < 1:
        raise ValueError(f"soft_dice_loss needs a foreground class to score, but the logits have "
                         f"{num_classes} channel(s); pass include_background=True.")
    target = _target_array(target, logits)
    xp = backend.get_array_module(target)
    # One-hot target (N, C, H, W) as a constant array: no gradient flows into the labels.
    onehot = (target[:, None, :, :] == xp.arange(num_classes).reshape(1, -1, 1, 1))
    dtype = logits.dtype
    if class_weights is None:
        # Made on the device (a fill, no host-to-device copy inside the training step).
        weights = xp.full(num_classes, 1.0 / (num_classes - first), dtype=dtype)
        weights[:first] = 0
    else:
        given = np.asarray(class_weights, dtype=np.float64).ravel()
        if given.size != num_classes:
            raise ValueError(f"class_weights has {given.size} entries for {num_classes} "
                             "classes; give one weight per class.")
        weights = np.zeros(num_classes)
        weights[first:] = given[first:] / given[first:].sum()
        weights = backend.to_device(weights.astype(dtype), logits.device)
    return SoftDice.apply(logits, onehot=onehot.astype(dtype), weights=weights,
                          axes=(2, 3) if per_image else (0, 2, 3), smooth=dtype.type(smooth))


def ce_dice_loss(logits, target, dice_weight=1.0, **dice_options):
    """Cross-entropy + dice_weight * soft Dice loss (for 2 classes: the usual "BCE + Dice")."""
    return F.cross_entropy(logits, _target_array(target, logits)) + \
        soft_dice_loss(logits, target, **dice_options) * dice_weight


bce_dice = ce_dice_loss


# ----------------------------------------------------------------------------- callables

class CrossEntropyLoss:
    """Plain pixel-wise softmax cross-entropy, optionally with per-class weights (C,)."""
    name = "ce"

    def __init__(self, class_weights=None):
        self.class_weights = class_weights

    def __call__(self, logits, target):
        weight = None
        if self.class_weights is not None:
            weight = backend.to_device(np.asarray(self.class_weights, dtype=logits.dtype), logits.device)
        return F.cross_entropy(logits, _target_array(target, logits), weight=weight)


class WeightedCrossEntropyLoss:
    """Cross-entropy weighted by the U-Net weight map, computed from each target on the fly."""
    name = "weighted_ce"

    def __init__(self, w0=10.0, sigma=5.0, class_weights="balanced"):
        self.options = {"w0": w0, "sigma": sigma, "class_weights": class_weights}

    def batch_inputs(self, target):
        """The weight map (N, H, W) of host labels target (N, H, W), made before the step, so
        that the step itself reads nothing back from the GPU (see seg.losses.batch_inputs)."""
        return (unet_weight_maps(target, **self.options),)

    def __call__(self, logits, target, weight_map=None):
        """weight_map: from batch_inputs, or None to compute it here (from GPU labels that
        is a device-to-host read inside the step)."""
        target = _target_array(target, logits)
        if weight_map is None:
            weight_map = unet_weight_maps(target, **self.options)
        return weighted_cross_entropy(logits, target, weight_map)


class DiceLoss:
    """soft_dice_loss as a callable; options as there."""
    name = "dice"

    def __init__(self, **options):
        self.options = options

    def __call__(self, logits, target):
        return soft_dice_loss(logits, target, **self.options)


class CEDiceLoss:
    """ce_dice_loss as a callable: cross-entropy + dice_weight * soft Dice."""
    name = "ce_dice"

    def __init__(self, dice_weight=1.0, **dice_options):
        self.dice_weight = dice_weight
        self.dice_options = dice_options

    def __call__(self, logits, target):
        return ce_dice_loss(logits, target, self.dice_weight, **self.dice_options)


def batch_inputs(loss_fn, host_target):
    """What loss_fn needs per batch beyond (logits, target) that is computed on the host from
    the labels, as a tuple to pass after the target: `loss_fn(logits, target, *extra)`.

    host_target: the batch's labels (N, H, W) while still in host memory (as the loader gave
    them). Only the U-Net weight map needs this ((weight_map,)); the other losses give ().
    Computing it here, before the labels go to the GPU, keeps the training step free of
    device-to-host reads, which a CUDA graph needs (seg.acceleration.GraphedSteps)."""
    make = getattr(loss_fn, "batch_inputs", None)
    return () if make is None else tuple(make(host_target))


LOSSES = {"ce": CrossEntropyLoss, "weighted_ce": WeightedCrossEntropyLoss, "dice": DiceLoss,
          "ce_dice": CEDiceLoss}


def get_loss(name, **options):
    """Build the loss called `name` ("ce", "weighted_ce", "dice", "ce_dice") with `options`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}.")
    return LOSSES[name](**options)
