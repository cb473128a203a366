"""The generic "images/ + masks/" folder layout: the reader for users' own data.

    my_data/
        images/  a.png  b.png  c.tif
        masks/   a.png  b.png  c.tif      # same stems, integer class ids per pixel

    data = ImageMaskFolder("my_data", num_classes=3)
    image, mask = data.load(data.samples[0])

Every bad input raises one clear sentence that names the offending file.
"""

from __future__ import annotations

import os
from pathlib import Path

from .describe import infer_in_channels, infer_mask_classes
from .readers import IMAGE_SUFFIXES
from .samples import Sample, load_sample, problem_reporter, split_by_subject

__all__ = ["find_folder_samples", "ImageMaskFolder"]


def _list_image_files(folder, report=problem_reporter()):
    """Map stem -> path for the TIFF/PNG files in one folder (hidden files skipped)."""
    found = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue  # README.txt, Thumbs.db, ...: not data
        if stem in found:
            report(entry.path,
                   f"Files {found[stem]} and {entry.path} share the stem '{stem}'; keep one file per stem.")
            continue
        found[stem] = entry.path
    return found


def find_folder_samples(root, images="images", masks="masks", require_masks=True, problems=None):
    """List the (image, mask) pairs of an ``images/`` + ``masks/`` folder.

    root: folder holding the two sub-folders (their names given by ``images`` and ``masks``).
    Images and masks are paired by file stem (``a.png`` <-> ``a.png`` or ``a.tif``).
    require_masks=False allows a missing ``masks/`` folder (unlabelled data; mask_path None).
    problems: a list to collect the pairing problems in, as (path, sentence), instead of raising a
        ValueError at the first one; incomplete pairs are then left out (see seg.data.check).
    Returns a list of Sample(image_path, mask_path, subject=stem, n=None), sorted by stem.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} does not exist.")
    image_dir, mask_dir = root / images, root / masks
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Data folder {root} has no '{images}' folder; put the images in {image_dir}.")
    report = problem_reporter(problems)
    image_files = _list_image_files(image_dir, report)
    if not image_files:
        raise ValueError(f"Image folder {image_dir} holds no {'/'.join(IMAGE_SUFFIXES)} files.")
    if not mask_dir.is_dir():
        if require_masks:
            raise FileNotFoundError(f"Data folder {root} has no '{masks}' folder; put the masks in {mask_dir}.")
        return [Sample(path, None, stem, None) for stem, path in image_files.items()]
    mask_files = _list_image_files(mask_dir, report)
    for stem, path in mask_files.items():
        if stem not in image_files:
            report(path, f"Mask {path} has no image with the stem '{stem}' in {image_dir}.")
    samples = []
    for stem, path in image_files.items():
        if stem not in mask_files:
            if require_masks:
                report(path, f"Image {path} has no mask with the stem '{stem}' in {mask_dir}.")
                continue
            samples.append(Sample(path, None, stem, None))
        else:
            samples.append(Sample(path, mask_files[stem], stem, None))
    return samples


class ImageMaskFolder:
    """A user's own ``root/images`` + ``root/masks`` data set.

    data = ImageMaskFolder(root, num_classes=3)
    data.samples                      list of Sample, sorted by stem
    data.load(sample)                 -> (image float32 (H, W), mask uint8/int64 (H, W))
    data.split(val_fraction, seed)    -> (train samples, validation samples)

    num_classes: when given, masks holding larger ids are rejected with a clear error.
    binary: masks are 0/255 (or 0/1) foreground masks, loaded as {0, 1}; None: read every mask
        now and infer binary and num_classes from the values (seg.data.describe; the result is
        in data.classes, data.classes.describe() says it in words).
    in_channels: 1 loads gray (H, W) images (colour converted), 3 loads RGB (H, W, 3); None:
        3 when any image file is colour, else 1 (file headers only).
    problems: a list collecting the pairing problems (and masks whose values fit no convention)
        instead of raising the first one; see find_folder_samples and the data check.
    """

    def __init__(self, root, images="images", masks="masks", num_classes=None, binary=False,
                 require_masks=True, in_channels=1, problems=None):
        self.root = Path(root)
        self.samples = find_folder_samples(root, images, masks, require_masks=require_masks,
                                           problems=problems)
        self.classes = None
        if binary is None:
            self.classes = infer_mask_classes(self.samples, num_classes, problems=problems)
            num_classes, binary = self.classes.num_classes, self.classes.binary
        self.num_classes = num_classes
        self.binary = binary
        self.in_channels = (infer_in_channels(self.samples, skip_unreadable=problems is not None)
                            if in_channels is None else int(in_channels))

    def __len__(self):
        return len(self.samples)

    def load(self, sample):
        """Sample -> (image float32 (H, W) or (H, W, 3) in [0, 1], mask (H, W) class ids or None)."""
        return load_sample(sample, binary=self.binary, num_classes=self.num_classes,
                           in_channels=self.in_channels)

    def split(self, val_fraction=0.2, seed=0):
        """Split by subject (here: by file stem); see ``seg.data.split_by_subject``."""
        return split_by_subject(self.samples, val_fraction, seed)
