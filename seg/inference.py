"""Using a trained model: rebuild it from a checkpoint, predict images of any size, score them.

    model, config = load_for_inference("runs/unet/best.npz")
    probs = predict_image(model, image, config["size"])          # (K, H, W) for image (H, W[, C])
    scores = evaluate_samples(model, reader, reader.samples, config["size"])

`predict_image` resizes an image to the training size, predicts it tile by tile
(seg.tiling.predict_tiled, so any size fits in memory), resizes the probabilities back and,
with crf=True, refines them with the dense CRF (seg.crf). `python -m seg predict / evaluate`
and the examples use these functions.
"""
import os

import numpy as np
import tifffile
from PIL import Image
from tqdm.auto import tqdm

from . import models
from .checkpoints import load_checkpoint, read_checkpoint_meta
from .data import resize
from .errors import UsageError
from .metrics import RunningScores
from .setup import open_checked_dataset
from .tiling import predict_tiled

__all__ = ["load_for_inference", "predict_image", "evaluate_samples", "crf_refine", "crf_report",
           "write_mask", "CRF_PARAMS"]

#: Dense-CRF settings of --crf (thetas for 0-255 intensities), chosen by a grid search on the
#: synthetic data's validation patients (see examples/crf_refine.py): the presets' smoothness
#: kernel (sxy 3, weight 3), DeepLab v1's bilateral sxy 49 / srgb 5 with weight 3, 5 iterations.
#: The "default" preset (bilateral sxy 80, weight 10, made for colour photos) lets the
#: background swallow the small nerve in these speckled grayscale frames.
CRF_PARAMS = {"gaussian": (3.0, 3.0), "bilateral": (49.0, 5.0, 3.0), "iterations": 5}


def load_for_inference(checkpoint, device="cpu"):
    """Rebuild the model stored in a seg.train checkpoint -> (model in eval mode, config)."""
    config = read_checkpoint_meta(checkpoint).get("config") or {}
    if "model" not in config:
        raise UsageError(f"checkpoint {checkpoint} has no model configuration; it was not written by "
                         "`python -m seg train` or examples/train_unet.py.")
    model = models.build(config["model"], num_classes=config["num_classes"],
                         in_channels=config.get("in_channels", 1), **config.get("model_options", {}))
    load_checkpoint(checkpoint, model)
    model.to(device)
    model.eval()
    return model, config


def crf_refine(probs, image):
    """The --crf hook: dense-CRF refinement of probs (K, H, W) using the image (H, W) or
    (H, W, 3) in [0, 1]."""
    try:
        # Imported here: only --crf needs the CRF, and an import failure becomes a usage error.
        from .crf import dense_crf
    except ImportError as exc:
        raise UsageError(f"--crf needs seg.crf, which could not be imported ({exc}).") from None
    return dense_crf(probs, np.clip(image * 255.0, 0, 255).astype(np.uint8), labels_axis=0, **CRF_PARAMS)


def predict_image(model, image, size=None, crf=False):
    """Class probabilities (K, H, W) for one image (H, W) or (H, W, C) float in [0, 1], at its
    own size.

    The image is resized to the training size, predicted (overlap-tile, so any size works),
    and the probabilities are resized back (bilinear); crf=True refines them with the dense CRF.
    """
    H, W = image.shape[:2]
    small = image if size is None else resize(image, None, tuple(size))[0]
    if small.ndim == 3:
        small = np.moveaxis(small, -1, 0)          # (C, H, W), as the network takes it
    probs = predict_tiled(model, small, oom_advice="predicting on the CPU (--device cpu)")
    if probs.shape[1:] != (H, W):
        up = resize(np.moveaxis(probs, 0, -1), None, (H, W), antialias=False)[0]
        probs = np.moveaxis(up, -1, 0)
        probs /= np.maximum(probs.sum(axis=0, keepdims=True), 1e-12)
    if crf:
        probs = crf_refine(probs, image)
    return np.ascontiguousarray(probs, dtype=np.float32)


def evaluate_samples(model, reader, samples, size=None, num_classes=2, crf=False, progress=True):
    """Metrics at the images' own resolution: Kaggle mean Dice, mean IoU, pixel accuracy.

    Returns {"images", "dice", "iou", "accuracy"} (seg.metrics.RunningScores.summary).
    """
    scores = RunningScores(num_classes)
    for sample in tqdm(samples, desc="evaluate", unit="image", disable=not progress, leave=False):
        image, mask = reader.load(sample)
        scores.add(predict_image(model, image, size, crf=crf).argmax(axis=0), mask)
    return scores.summary()


def crf_report(args, data, log=print):
    """Score the validation images at full resolution without and with the dense CRF.

    args: the training options (out, device, num_classes, val_fraction, progress); data: what
    seg.setup.prepare_data returned for the run. The model is OUT/best.npz.
    """
    model, config = load_for_inference(os.path.join(args.out, "best.npz"), args.device)
    reader, _, num_classes, report = open_checked_dataset(data.root, config["num_classes"],
                                                          config.get("in_channels", 1))
    reader.samples = report.samples      # what --skip-bad left out of training stays out here too
    _, val_samples = reader.split(args.val_fraction, seed=0)
    for crf in (False, True):
        scores = evaluate_samples(model, reader, val_samples, config["size"], num_classes, crf=crf,
                                  progress=args.progress)
        log(f"best model, validation at full resolution{' + dense CRF' if crf else ''}: "
            f"Dice {scores['dice']:.4f}  IoU {scores['iou']:.4f}  accuracy {scores['accuracy']:.4f}")


def write_mask(path, labels, binary, fmt):
    """Write a label map (H, W): binary -> 0/255 (the Kaggle convention), else class ids, uint8.

    fmt: "png" or "tiff". Written to a temporary file first, then renamed over `path`.
    """
    array = (labels != 0).astype(np.uint8) * 255 if binary else labels.astype(np.uint8)
    tmp = f"{path}.tmp"
    if fmt == "png":
        Image.fromarray(array).save(tmp, format="PNG")
    else:
        tifffile.imwrite(tmp, array, metadata=None)
    os.replace(tmp, path)
