"""Segmentation metrics on integer label maps (pure NumPy).

Every function takes a predicted label map and a ground-truth label map of the same shape,
either one image (H, W) or a batch (N, H, W), holding integer class ids. Take the argmax of
the network scores first: ``pred = logits.argmax(axis=1)`` turns (N, C, H, W) into (N, H, W).

Conventions used here:

- ``confusion_matrix[t, p]`` counts pixels whose true class is ``t`` and predicted class is
  ``p`` (rows = truth, columns = prediction), so the diagonal holds the correct pixels.
- IoU of class c = TP / (TP + FP + FN). A class absent from both prediction and target has
  0 / 0 = NaN and is left out of the mean, instead of counting as 0 or 1.
- Dice is the Kaggle Ultrasound Nerve Segmentation score: binary (any non-zero label is
  foreground), computed per image, and an empty prediction on an empty mask scores 1.
- With more than 2 classes, that binary Dice cannot tell the classes apart (a prediction with
  classes 1 and 2 swapped would score 1), so RunningScores reports the Dice of every class,
  2 TP / (2 TP + FP + FN) from the summed confusion matrix, and their mean over the
  foreground classes 1..K-1 (``dice_from_confusion``).

To score a whole data set batch by batch, add up ``confusion_matrix`` results and call
``iou_from_confusion`` / ``accuracy_from_confusion`` once at the end; averaging per-batch IoUs
would weight small batches wrongly.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "confusion_matrix",
    "iou_from_confusion",
    "accuracy_from_confusion",
    "dice_from_confusion",
    "class_columns",
    "format_class_scores",
    "format_class_table",
    "iou_per_class",
    "mean_iou",
    "dice_score",
    "mean_dice",
    "pixel_accuracy",
    "RunningScores",
]


def _as_numpy(x, name):
    """Return ``x`` as a NumPy array; accepts CuPy arrays and objects with ``.numpy()``."""
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()  # device -> host copy
    if hasattr(x, "numpy") and callable(x.numpy):  # e.g. a minidl.Tensor
        return np.asarray(x.numpy())
    try:
        return np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be an array of integer class ids, got {type(x).__name__}.") from exc


def _check_pair(pred, target):
    """Validate a (pred, target) pair of label maps and return them as NumPy arrays."""
    pred = _as_numpy(pred, "pred")
    target = _as_numpy(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred shape {pred.shape} does not match target shape {target.shape}; "
            "both must be (H, W) or (N, H, W) label maps (take argmax over the class axis first)."
        )
    if pred.ndim not in (2, 3):
        raise ValueError(
            f"expected label maps of shape (H, W) or (N, H, W), got {pred.ndim} dimensions {pred.shape}."
        )
    for name, a in (("pred", pred), ("target", target)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise TypeError(
                f"{name} must hold integer class ids, got dtype {a.dtype}; "
                "use scores.argmax(axis=1) to turn (N, C, H, W) scores into labels."
            )
    return pred, target


def confusion_matrix(pred, target, num_classes, ignore_index=None):
    """Count (true class, predicted class) pixel pairs.

    pred, target: (H, W) or (N, H, W) integer class ids in [0, num_classes).
    ignore_index: pixels whose *target* equals this value are not counted (e.g. CamVid's 11).
    Returns an int64 array (num_classes, num_classes): ``cm[t, p]`` = number of pixels with
    true class t predicted as p.
    """
    pred, target = _check_pair(pred, target)
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    p = pred.ravel().astype(np.int64)
    t = target.ravel().astype(np.int64)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    for name, a in (("target", t), ("pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            bad = a[(a < 0) | (a >= num_classes)][0]
            raise ValueError(
                f"{name} holds class id {bad}, outside [0, {num_classes}); "
                "check num_classes or pass ignore_index for the label to skip."
            )
    # One bincount over the joint index t*K + p is much faster than a Python loop over classes.
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def iou_from_confusion(cm):
    """Per-class IoU from a confusion matrix (K, K); NaN for classes absent from both maps.

    Returns float64 (K,).
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square (K, K), got shape {cm.shape}.")
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp  # predicted + true - counted twice
    iou = np.full(cm.shape[0], np.nan)
    present = union > 0
    iou[present] = tp[present] / union[present]
    return iou


def dice_from_confusion(cm):
    """Per-class Dice 2 TP / (2 TP + FP + FN) from a confusion matrix (K, K); NaN for classes
    absent from both maps. Returns float64 (K,)."""
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square (K, K), got shape {cm.shape}.")
    tp = np.diag(cm)
    total = cm.sum(axis=0) + cm.sum(axis=1)          # predicted + true = 2 TP + FP + FN
    dice = np.full(cm.shape[0], np.nan)
    present = total > 0
    dice[present] = 2.0 * tp[present] / total[present]
    return dice


def accuracy_from_confusion(cm):
    """Fraction of counted pixels on the diagonal; NaN when nothing was counted."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else float("nan")


def iou_per_class(pred, target, num_classes, ignore_index=None):
    """Intersection over union for each class.

    pred, target: (H, W) or (N, H, W) integer class ids.
    Returns float64 (num_classes,), NaN where the class appears in neither pred nor target.
    """
    return iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def mean_iou(pred, target, num_classes, ignore_index=None):
    """Mean IoU over the classes present in pred or target (absent classes are skipped).

    Returns a Python float; NaN only when no pixel was counted at all.
    """
    return _mean_present(iou_per_class(pred, target, num_classes, ignore_index))


def _mean_present(iou):
    """Mean of the non-NaN entries of a per-class IoU; NaN when every class is absent."""
    present = ~np.isnan(iou)
    # np.nanmean would warn on an all-NaN input; an explicit check keeps the output quiet.
    return float(iou[present].mean()) if present.any() else float("nan")


def dice_score(pred, target):
    """Binary Dice coefficient per image, Kaggle rule: both empty -> 1.

    pred, target: (H, W) or (N, H, W); any non-zero value is foreground.
    Dice = 2 |P & T| / (|P| + |T|).
    Returns a float for (H, W) input, a float64 array (N,) for (N, H, W) input.
    """
    pred, target = _check_pair(pred, target)
    single = pred.ndim == 2
    p = (pred != 0).reshape(1 if single else pred.shape[0], -1)
    t = (target != 0).reshape(p.shape)
    inter = np.count_nonzero(p & t, axis=1).astype(np.float64)
    total = np.count_nonzero(p, axis=1) + np.count_nonzero(t, axis=1)
    # Empty prediction on an empty mask is a correct "no nerve here" answer: score 1.
    dice = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)
    return float(dice[0]) if single else dice


def mean_dice(pred, target):
    """Mean over images of the Kaggle Dice score (the competition's metric).

    pred, target: (H, W) (one image) or (N, H, W). Returns a Python float.
    """
    return float(np.mean(dice_score(pred, target)))


def pixel_accuracy(pred, target, ignore_index=None):
    """Fraction of pixels whose predicted class equals the true class.

    pred, target: (H, W) or (N, H, W) integer class ids; target pixels equal to
    ignore_index are skipped. Returns a Python float (NaN if every pixel is ignored).
    """
    pred, target = _check_pair(pred, target)
    keep = np.ones(target.shape, dtype=bool) if ignore_index is None else target != ignore_index
    n = np.count_nonzero(keep)
    if n == 0:
        return float("nan")
    return float(np.count_nonzero((pred == target) & keep) / n)


class RunningScores:
    """A data set's scores, added up batch by batch (the validation loop and `seg evaluate`).

        scores = RunningScores(num_classes)
        for pred, target in batches:            # label maps (H, W) or (N, H, W)
            scores.add(pred, target)
        scores.summary()    # {"images", "dice", "iou" (mean), "accuracy" (pixels), per class}

    "dice" is the score the best checkpoint is chosen by. For 2 classes it is the Kaggle mean
    Dice, averaged over images; for more, the mean of the per-class Dice over the foreground
    classes 1..K-1. Per-class values, IoU and accuracy come from the summed confusion matrix, so
    every pixel counts the same whatever the batch sizes.
    """

    def __init__(self, num_classes):
        self.num_classes = int(num_classes)
        self.dice = []
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, pred, target):
        self.dice.extend(np.atleast_1d(dice_score(pred, target)).tolist())
        self.confusion += confusion_matrix(pred, target, self.num_classes)

    def summary(self):
        """{"images": n, "dice", "iou", "accuracy", "num_classes", "dice_per_class",
        "iou_per_class"}: Python floats (lists of K for the per-class ones), NaN where nothing
        was added or a class is absent from both prediction and truth."""
        dice_per_class = dice_from_confusion(self.confusion)
        if self.num_classes > 2:
            dice = _mean_present(dice_per_class[1:])
        else:
            dice = float(np.mean(self.dice)) if self.dice else float("nan")
        return {"images": len(self.dice), "dice": dice,
                "iou": _mean_present(iou_from_confusion(self.confusion)),
                "accuracy": accuracy_from_confusion(self.confusion),
                "num_classes": self.num_classes,
                "dice_per_class": dice_per_class.tolist(),
                "iou_per_class": iou_from_confusion(self.confusion).tolist()}


def class_columns(summary, prefix="val_"):
    """The per-class scores of a RunningScores summary as flat columns, for more than 2 classes
    only: {"val_dice_c0": ..., "val_iou_c0": ..., ...} (empty for 2 classes)."""
    if summary.get("num_classes", 2) <= 2:
        return {}
    columns = {}
    for name in ("dice", "iou"):
        for k, value in enumerate(summary[f"{name}_per_class"]):
            columns[f"{prefix}{name}_c{k}"] = value
    return columns


def format_class_scores(columns, prefix="val_"):
    """'  Dice per class 0.99/0.81/0.62' from class_columns' output ('' when there is none)."""
    dice = [v for k, v in columns.items() if k.startswith(f"{prefix}dice_c")]
    if not dice:
        return ""
    return "  Dice per class " + "/".join(f"{v:.2f}" for v in dice)


def format_class_table(summary):
    """Per-class Dice and IoU of a RunningScores summary as table lines, each starting with a
    newline; '' for 2 classes (whose Dice is the Kaggle score)."""
    if summary.get("num_classes", 2) <= 2:
        return ""
    lines = [f"\n  {'class':>5}  {'Dice':>6}  {'IoU':>6}"]
    for k, (dice, iou) in enumerate(zip(summary["dice_per_class"], summary["iou_per_class"])):
        lines.append(f"\n  {k:>5}  {dice:>6.4f}  {iou:>6.4f}")
    return "".join(lines)
