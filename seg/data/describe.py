"""What a data set holds, read off its files: the images' channel count and the masks' classes.

    channels = infer_in_channels(samples)            # 3 if any image is colour, else 1
    classes = infer_mask_classes(samples)            # MaskClasses(num_classes, binary, values)
    print(classes.describe())                        # "mask values {0, 255}: binary ..."

Masks are stored in two conventions, and the values alone tell them apart:

- binary foreground masks hold only 0/255 (the Kaggle convention) or only 0/1: 2 classes,
  loaded as {0, 1};
- class-id masks hold 0, 1, ..., K-1 (every class present somewhere): K classes.

Anything else (0/128, or ids with 255 mixed in, as VOC's "void" border) fits neither and is
refused with one sentence, since guessing would train on the wrong classes.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from .readers import image_channels, read_array, to_class_ids

__all__ = ["MaskClasses", "infer_mask_classes", "infer_in_channels"]


class MaskClasses(NamedTuple):
    """How a data set's masks are read: num_classes, binary (0/255 or 0/1 -> {0, 1}), and the
    sorted values found in the mask files."""

    num_classes: int
    binary: bool
    values: tuple

    def describe(self):
        """One line for the log, e.g. 'mask values {0, 255}: binary foreground masks, 2 classes'."""
        kind = "binary foreground masks" if self.binary else "class ids"
        return f"mask values {_show(self.values)}: {kind}, {self.num_classes} classes"


def _show(values, limit=8):
    """{0, 1, 2} or {0, 1, ..., 255} for a message."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:limit]) + (", ..." if len(values) > limit else "")
    return "{" + shown + "}"


def _is_binary(values):
    return set(values) <= {0, 255} or set(values) <= {0, 1}


def infer_mask_classes(samples, num_classes=None, problems=None):
    """Read every mask of `samples` (Sample list) and decide how to load them -> MaskClasses.

    num_classes=None: inferred from the values (binary masks: 2; ids 0..K-1: K).
    num_classes=K: checked against the values (K=2 also accepts 0/255 masks as binary).
    Raises ValueError with one sentence when the values fit neither convention.
    problems: a list (the data check's, seg.data.check): masks that cannot be read are passed
        over (the check reports each), and values fitting no convention are appended to it as
        (mask folder, sentence) instead of raised (num_classes None); the masks are then read as num_classes
        class ids (binary 0/255 masks when num_classes is None), so that the check can name the
        masks that do not fit.
    """
    if problems is None:
        return _infer_mask_classes(samples, num_classes, skip_unreadable=False)
    try:
        return _infer_mask_classes(samples, num_classes, skip_unreadable=True)
    except ValueError as exc:
        if num_classes is None:      # given num_classes: the check names each mask that breaks it
            folders = [os.path.dirname(s.mask_path) for s in samples if s.mask_path is not None]
            problems.append((folders[0] if folders else "", str(exc)))
        fallback = int(num_classes or 2)
        return MaskClasses(fallback, num_classes is None, ())


def _infer_mask_classes(samples, num_classes, skip_unreadable):
    found, first_file = set(), {}
    for sample in samples:
        if sample.mask_path is None:
            continue
        try:
            ids = to_class_ids(read_array(sample.mask_path), sample.mask_path)   # integer, >= 0, 2-D
        except (ValueError, OSError):
            if not skip_unreadable:
                raise
            continue
        for v in np.unique(ids).tolist():
            if v not in found:
                found.add(v)
                first_file[v] = sample.mask_path
    values = tuple(sorted(found))
    if not values:
        raise ValueError("The data set has no masks; training needs an image/mask pair per sample.")
    folder = os.path.dirname(first_file[values[-1]])
    if num_classes is None:
        if _is_binary(values):
            return MaskClasses(2, True, values)
        if values == tuple(range(len(values))):
            return MaskClasses(len(values), False, values)
        void = " (255 is often a 'void' border label: map it to a class first)" if 255 in values else ""
        raise ValueError(
            f"The masks in {folder} hold the values {_show(values)}, which are neither binary masks "
            f"(only 0/255 or only 0/1) nor class ids 0..K-1 with every class present{void}; save "
            "them in one of these conventions, or give the number of classes (--num-classes) if "
            "some classes are absent.")
    num_classes = int(num_classes)
    if num_classes == 2 and _is_binary(values):
        return MaskClasses(2, True, values)
    if values[-1] >= num_classes:
        hint = (" (0/255 masks are binary foreground masks: use 2 classes)"
                if _is_binary(values) else "")
        raise ValueError(
            f"Mask {first_file[values[-1]]} holds the value {values[-1]}, but the number of "
            f"classes is {num_classes}, so class ids must be below {num_classes}{hint}.")
    return MaskClasses(num_classes, False, values)


def infer_in_channels(samples, skip_unreadable=False):
    """3 when any image of `samples` is colour (RGB/RGBA), else 1; reads file headers only.

    skip_unreadable: pass over files whose header cannot be read (the data check reports them)
    instead of raising."""
    channels = 1
    for s in samples:
        try:
            channels = max(channels, image_channels(s.image_path))
        except (ValueError, OSError):
            if not skip_unreadable:
                raise
    return channels
