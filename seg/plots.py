"""Training pictures: loss/Dice curves and the talk's "X / Y / Pred" sample panels.

    plot_curves(history, "runs/unet/curves.png")
    plot_samples(images, masks, preds, "runs/unet/samples_last.png")

matplotlib runs with the Agg backend (no window, works on servers). Files are written to a
temporary name and renamed, so a viewer never sees half a PNG.
"""
import os

import numpy as np

__all__ = ["plot_curves", "plot_samples"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, bbox_inches=None):
    """Write `fig` as a PNG atomically (temp file, then rename) and close it; returns the path."""
    plt = _pyplot()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches=bbox_inches)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def plot_curves(history, path):
    """Two panels: training/validation loss, and validation Dice / IoU / accuracy per epoch.

    history: list of dicts with keys epoch, train_loss and optionally val_loss, val_dice,
    val_iou, val_accuracy (seg.train's rows).
    """
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]

    def column(key):
        return np.array([row.get(key, np.nan) for row in history], dtype=float)

    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 3.6))
    marker = "o" if len(epochs) < 30 else None
    ax_loss.plot(epochs, column("train_loss"), marker=marker, label="train")
    if np.isfinite(column("val_loss")).any():
        ax_loss.plot(epochs, column("val_loss"), marker=marker, label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    # More than 2 classes: val_dice is the mean per-class Dice (seg.metrics.RunningScores).
    multiclass = any(key.startswith("val_dice_c") for key in (history[-1] if history else {}))
    for key, label in (("val_dice", "mean Dice" if multiclass else "Dice (Kaggle)"), ("val_iou", "mean IoU"),
                       ("val_accuracy", "pixel accuracy")):
        values = column(key)
        if np.isfinite(values).any():
            ax_score.plot(epochs, values, marker=marker, label=label)
    ax_score.set_ylim(0, 1.02)
    ax_score.set_xlabel("epoch")
    ax_score.set_title("validation")
    ax_score.legend(loc="lower right")
    ax_score.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _gray(image):
    """(C, H, W) or (H, W) -> something imshow draws: (H, W) gray or (H, W, 3) RGB in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:
        image = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1)
    lo, hi = float(image.min()), float(image.max())
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def _overlay(image, labels, colour=(1.0, 0.2, 0.2), alpha=0.45):
    """The image in gray with every non-zero label painted in `colour` (RGB (H, W, 3))."""
    base = _gray(image)
    rgb = np.repeat(base[..., None], 3, axis=-1) if base.ndim == 2 else base.copy()
    fg = np.asarray(labels) != 0
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * np.asarray(colour)
    return rgb


def plot_samples(images, masks, preds, path, title=None, max_rows=4):
    """The "X / Y / Pred" panel: one row per sample, columns image, ground truth, prediction.

    images: (N, C, H, W) or (N, H, W); masks, preds: (N, H, W) integer labels.
    The ground truth is drawn as a label map; the prediction is overlaid on the image in red
    with the true outline in green, so misses and false alarms are visible at a glance.
    """
    plt = _pyplot()
    n = min(len(images), int(max_rows))
    if n == 0:
        raise ValueError("plot_samples needs at least one sample.")
    h, w = np.asarray(masks[0]).shape
    cell = 2.6
    fig, axes = plt.subplots(n, 3, figsize=(3 * cell * max(w / h, 0.5), n * cell), squeeze=False)
    num_labels = max(int(np.max(masks[:n])), int(np.max(preds[:n])), 1)
    for i in range(n):
        ax_x, ax_y, ax_p = axes[i]
        ax_x.imshow(_gray(images[i]), cmap="gray", vmin=0, vmax=1)
        ax_y.imshow(masks[i], cmap="viridis", vmin=0, vmax=num_labels, interpolation="nearest")
        ax_p.imshow(_overlay(images[i], preds[i]))
        if np.any(masks[i]):
            ax_p.contour(np.asarray(masks[i]) != 0, levels=[0.5], colors=["lime"], linewidths=1.0)
        if i == 0:
            ax_x.set_title("X (image)")
            ax_y.set_title("Y (ground truth)")
            ax_p.set_title("Pred (red; truth outline green)")
        for ax in (ax_x, ax_y, ax_p):
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
