"""Reader for the Kaggle Ultrasound Nerve Segmentation layout.

The competition's data (and the synthetic stand-in from ``seg.data.synthetic``) look like::

    root/
        train/  1_1.tif  1_1_mask.tif  1_2.tif  1_2_mask.tif ... 47_120.tif 47_120_mask.tif
        test/   1.tif  2.tif ...

``train/<subject>_<n>.tif`` is a 580 wide x 420 high grayscale uint8 ultrasound frame of
patient ``<subject>``; ``train/<subject>_<n>_mask.tif`` marks the brachial plexus nerve with
255 (background 0), and is all zero in about half the frames. Test images have no masks.

Frames of one patient are near-duplicates, so a validation set must hold *other patients*
(``split_by_subject``), or the validation score would measure memorisation.

    data = KaggleUltrasound("data/ultrasound")       # the folder holding train/, or train/ itself
    train, val = data.split(val_fraction=0.2, seed=0)
    image, mask = load_sample(train[0])               # float32 (420, 580) in [0,1], uint8 {0,1}
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .readers import check_same_size
from .samples import Sample, load_sample, problem_reporter, split_by_subject

__all__ = ["find_kaggle_samples", "find_kaggle_test_samples", "KaggleUltrasound"]

_TRAIN_NAME = re.compile(r"^(\d+)_(\d+)(_mask)?\.tiff?$", re.IGNORECASE)
_TEST_NAME = re.compile(r"^(\d+)\.tiff?$", re.IGNORECASE)


def _train_dir(root):
    """Accept the folder holding ``train/`` or ``train/`` itself; return the train folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} does not exist.")
    if (root / "train").is_dir():
        return root / "train"
    if root.name.lower() == "train" or any(_TRAIN_NAME.match(name) for name in os.listdir(root)):
        return root
    raise FileNotFoundError(
        f"Data folder {root} has no train/ folder and no <subject>_<n>.tif images; "
        "pass the Kaggle data folder (the one holding train/) or the train/ folder itself."
    )


def _tiff_shape(path):
    """Height and width of a TIFF from its header alone (fast: no pixel data is read)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tuple(tif.pages[0].shape[:2])
    except Exception as exc:
        raise ValueError(f"Could not read TIFF file {path} ({exc}); the file is damaged or not a TIFF.") from exc


def find_kaggle_samples(root, verify=False, problems=None):
    """List the training pairs of a Kaggle-layout folder.

    root: the folder holding ``train/``, or the ``train/`` folder itself.
    verify: also open every file's TIFF header to catch unreadable files and image/mask size
        mismatches now instead of at load time (about a millisecond per file).
    problems: a list to collect the naming and pairing problems in, as (path, sentence), instead
        of raising a ValueError at the first one; incomplete pairs are then left out
        (seg.data.check reports them all at once).
    Returns a list of Sample(image_path, mask_path, subject: int, n: int), sorted numerically
    by (subject, n) so the order is the same on every machine.
    """
    train = _train_dir(root)
    report = problem_reporter(problems)
    images, masks = {}, {}
    for name in sorted(os.listdir(train)):
        path = os.path.join(train, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if not name.lower().endswith((".tif", ".tiff")):
            continue  # e.g. train_masks.csv from the Kaggle download
        m = _TRAIN_NAME.match(name)
        if m is None:
            report(path, f"File {path} does not follow the Kaggle naming <subject>_<n>.tif / "
                         "<subject>_<n>_mask.tif.")
            continue
        key = (int(m.group(1)), int(m.group(2)))
        table = masks if m.group(3) else images
        if key in table:
            report(path, f"Files {table[key]} and {path} both stand for subject {key[0]} image {key[1]}.")
            continue
        table[key] = path
    if not images and not masks and not problems:
        raise ValueError(f"Train folder {train} holds no .tif images.")
    for key in sorted(masks):
        if key not in images:
            report(masks[key],
                   f"Mask {masks[key]} has no image: expected {os.path.join(train, f'{key[0]}_{key[1]}.tif')}.")
    samples = []
    for key in sorted(images):
        if key not in masks:
            expected = os.path.join(train, f"{key[0]}_{key[1]}_mask.tif")
            report(images[key], f"Image {images[key]} has no mask: expected {expected}.")
            continue
        samples.append(Sample(images[key], masks[key], key[0], key[1]))
    if verify:
        for s in samples:
            image_shape, mask_shape = _tiff_shape(s.image_path), _tiff_shape(s.mask_path)
            if image_shape != mask_shape:
                check_same_size(np.empty(image_shape), np.empty(mask_shape), s.image_path, s.mask_path)
    return samples


def find_kaggle_test_samples(root):
    """List the unlabelled test images ``test/<n>.tif`` beside ``train/``.

    root: the folder holding ``test/`` (or ``train/`` itself, whose sibling ``test/`` is used).
    Returns Sample(image_path, None, None, n) sorted by n; an empty list when there is no test/.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} does not exist.")
    test = root / "test"
    if not test.is_dir() and root.name.lower() == "train":
        test = root.parent / "test"
    if not test.is_dir():
        return []
    samples = []
    for name in os.listdir(test):
        path = os.path.join(test, name)
        if name.startswith(".") or not os.path.isfile(path) or not name.lower().endswith((".tif", ".tiff")):
            continue
        m = _TEST_NAME.match(name)
        if m is None:
            raise ValueError(f"File {path} does not follow the Kaggle test naming <n>.tif.")
        samples.append(Sample(path, None, None, int(m.group(1))))
    return sorted(samples, key=lambda s: s.n)


class KaggleUltrasound:
    """The Kaggle ultrasound-nerve data set on disk.

    data = KaggleUltrasound(root, verify=False, in_channels=1, problems=None)   # problems: see find_kaggle_samples
    data.samples          training Samples (subject, n), sorted
    data.test_samples     test Samples (mask_path None), possibly empty
    data.split(val_fraction=0.2, seed=0) -> (train, val) lists, disjoint in subjects
    data.load(sample)     -> (image float32 (H, W) in [0, 1], mask uint8 (H, W) in {0, 1} or None)

    in_channels=3 gives the (gray) frames as (H, W, 3), for models that take RGB input.
    """

    num_classes = 2

    def __init__(self, root, verify=False, in_channels=1, problems=None):
        self.root = Path(root)
        self.in_channels = int(in_channels)
        self.samples = find_kaggle_samples(root, verify=verify, problems=problems)
        self.test_samples = find_kaggle_test_samples(root)

    def __len__(self):
        return len(self.samples)

    @property
    def subjects(self):
        """Sorted list of the subject ids present in the training set."""
        return sorted({s.subject for s in self.samples})

    def split(self, val_fraction=0.2, seed=0):
        return split_by_subject(self.samples, val_fraction, seed)

    def load(self, sample):
        return load_sample(sample, in_channels=self.in_channels)
