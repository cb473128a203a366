"""One data set item (``Sample``), how to load it, and how to split items by subject.

Every reader (``seg.data.kaggle``, ``seg.data.folder``) lists its data as Samples; the
functions here work on the samples of any reader:

    image, mask = load_sample(sample)                   # (H, W) float32, (H, W) class ids
    train, val = split_by_subject(samples, val_fraction=0.2, seed=0)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .readers import check_same_size, load_image, load_mask

__all__ = ["Sample", "load_sample", "split_by_subject", "problem_reporter"]


class Sample(NamedTuple):
    """One training/test item.

    image_path: path of the image file.
    mask_path:  path of its mask, or None for unlabelled (test) images.
    subject:    who/what the image comes from; images of one subject are kept on one side of
                a train/validation split (Kaggle: the patient number; folders: the file stem).
    n:          the image number within its subject (Kaggle), or None.
    """

    image_path: str
    mask_path: str | None
    subject: int | str | None
    n: int | None


def load_sample(sample, binary=True, num_classes=None, in_channels=1):
    """Load one Sample -> (image float32 (H, W) in [0, 1], mask (H, W) class ids).

    in_channels=3 gives the image as (H, W, 3) RGB (gray files repeated in the three channels);
    1 gives gray (H, W), colour files converted (see ``seg.data.readers.to_float_image``).
    The mask is None for an unlabelled (test) sample.
    binary=True (the Kaggle masks): the mask must hold only 0/255 (or 0/1) and comes back as
        uint8 {0, 1}; binary=False: integer class ids, checked against num_classes when given
        (see ``seg.data.readers.to_class_ids``).
    """
    image = load_image(sample.image_path, in_channels)
    if sample.mask_path is None:
        return image, None
    mask = load_mask(sample.mask_path, binary=binary, num_classes=num_classes)
    check_same_size(image, mask, sample.image_path, sample.mask_path)
    return image, mask


def split_by_subject(samples, val_fraction=0.2, seed=0):
    """Split samples into (train, validation) so that no subject is on both sides.

    samples: list of Sample (any reader's).
    val_fraction: share of *subjects* (not images) that go to validation, in [0, 1). At least
        one subject goes to validation when val_fraction > 0 and there are two or more, and at
        least one always stays in training.
    seed: the same seed always gives the same split (independent of the input order).
    Returns two lists of Sample, each in the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    # Sort subjects by their string form so mixed int/str ids still sort, and the split does not
    # depend on the order the samples came in.
    subjects = sorted({s.subject for s in samples}, key=lambda v: (str(type(v)), str(v).zfill(12)))
    n_val = int(round(val_fraction * len(subjects)))
    if val_fraction > 0 and len(subjects) >= 2:
        n_val = min(max(n_val, 1), len(subjects) - 1)
    else:
        n_val = 0
    order = np.random.default_rng(seed).permutation(len(subjects))
    val_subjects = {subjects[i] for i in order[:n_val]}
    train = [s for s in samples if s.subject not in val_subjects]
    val = [s for s in samples if s.subject in val_subjects]
    return train, val


def problem_reporter(problems=None):
    """report(path, sentence) for the data set readers: raises the sentence as a ValueError when
    `problems` is None, else appends (path, sentence) to that list so that a data check can
    name every problem at once (seg.data.check)."""
    def report(path, sentence):
        if problems is None:
            raise ValueError(sentence)
        problems.append((path, sentence))
    return report
