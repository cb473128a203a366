"""Reading images and masks from disk, and the generic "images/ + masks/" folder layout.

This module holds the file-level helpers every reader in ``seg.data`` shares:

- ``read_array(path)``  the raw array stored in a TIFF (tifffile) or PNG (Pillow, with a
  matplotlib fallback) file;
- ``load_image(path)``  -> float32 (H, W) in [0, 1], the network input;
- ``load_mask(path)``   -> integer class ids (H, W), the training target;
- ``Sample``            one (image path, mask path, subject id, n) record.

and the reader for users' own data::

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
from typing import NamedTuple

import numpy as np

__all__ = [
    "Sample",
    "read_array",
    "to_float_image",
    "to_class_ids",
    "load_image",
    "load_mask",
    "find_folder_samples",
    "load_folder_sample",
    "ImageMaskFolder",
    "IMAGE_SUFFIXES",
]

#: File types the readers understand (lower-case suffixes).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


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


# ----------------------------------------------------------------------------- raw file reading


def _read_tiff(path):
    import tifffile

    try:
        return tifffile.imread(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file {path} does not exist.") from None
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise ValueError(f"Could not read TIFF file {path} ({exc}); the file is damaged or not a TIFF.") from exc


def _read_png(path):
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is installed here; kept for other setups
        Image = None
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file {path} does not exist.")
    if Image is not None:
        try:
            with Image.open(path) as im:
                mode = im.mode
                # np.array copies the pixels while the file is still open. Palette ('P') images
                # give their palette indices, which is what VOC-style masks store.
                a = np.array(im)
        except Exception as exc:
            raise ValueError(f"Could not read PNG file {path} ({exc}); the file is damaged or not a PNG.") from exc
        if mode.startswith("I") and a.dtype != np.uint16 and a.size and 0 <= a.min() and a.max() <= 65535:
            a = a.astype(np.uint16)  # Pillow opens some 16-bit PNGs as 32-bit 'I' mode
        return a
    import matplotlib.image as mpimg  # pragma: no cover

    try:  # pragma: no cover
        a = mpimg.imread(path)
    except Exception as exc:  # pragma: no cover
        raise ValueError(f"Could not read PNG file {path} ({exc}); the file is damaged or not a PNG.") from exc
    # matplotlib returns floats in [0, 1]; assume 8-bit data to get the stored integers back.
    return np.rint(a * 255).astype(np.uint8)  # pragma: no cover


def read_array(path):
    """Return the array stored in a TIFF or PNG file, as stored (dtype and channels untouched)."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".tif", ".tiff"):
        return _read_tiff(path)
    if suffix == ".png":
        return _read_png(path)
    raise ValueError(f"File {path} has an unsupported type; use one of {', '.join(IMAGE_SUFFIXES)}.")


# ----------------------------------------------------------------------------- array conversion


def _squeeze_to_2d_or_channels(a, path, what):
    """Drop size-1 axes; return (H, W) or (H, W, C) or raise."""
    a = np.squeeze(a)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)):
        return a
    raise ValueError(
        f"{what} file {path} holds an array of shape {a.shape}; expected one 2-D image (H, W) "
        "or an RGB(A) image (H, W, 3|4), not a stack of pages."
    )


def to_float_image(a, path="<array>"):
    """Convert a stored image array to float32 (H, W) in [0, 1].

    uint8 is divided by 255 and uint16 by 65535 (their full ranges). Other dtypes have no
    standard scale: they are kept if already in [0, 1], else min-max stretched to [0, 1].
    RGB(A) is turned into gray with the ITU-R BT.601 luminance weights 0.299, 0.587, 0.114.
    """
    a = _squeeze_to_2d_or_channels(np.asarray(a), path, "Image")
    if a.dtype == np.bool_:
        x = a.astype(np.float32)
    elif a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"Image file {path} contains NaN or infinite values.")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    else:
        raise ValueError(f"Image file {path} has unsupported dtype {a.dtype}; expected integers or floats.")
    if x.ndim == 3:
        x = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114  # alpha (if any) ignored
    return np.ascontiguousarray(x, dtype=np.float32)


def to_class_ids(a, path="<array>", binary=False, num_classes=None):
    """Convert a stored mask array to integer class ids (H, W).

    binary=True: the mask must hold only 0/255 (Kaggle) or only 0/1; returns uint8 {0, 1}.
    binary=False: the mask holds class ids >= 0 (checked against num_classes when given);
    returns uint8 when every id fits, else int64.
    A 3-channel mask is accepted only when its channels are identical (a gray mask saved as RGB).
    """
    a = np.squeeze(np.asarray(a))
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        rgb = a[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise ValueError(
                f"Mask file {path} is a colour image; save one channel of integer class ids instead."
            )
        a = rgb[..., 0]
    if a.ndim != 2:
        raise ValueError(f"Mask file {path} holds an array of shape {a.shape}; expected one 2-D mask (H, W).")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ValueError(f"Mask file {path} holds non-integer values; masks must store integer class ids.")
    elif not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"Mask file {path} has unsupported dtype {a.dtype}; expected integer class ids.")
    values = np.unique(a)
    if binary:
        if set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}:
            return (a > 0).astype(np.uint8)
        shown = ", ".join(str(v) for v in values[:6].tolist()) + (", ..." if values.size > 6 else "")
        raise ValueError(
            f"Mask file {path} holds values {{{shown}}}; a binary mask must hold only 0/255 or only 0/1."
        )
    if values.size and values[0] < 0:
        raise ValueError(f"Mask file {path} holds negative value {values[0]}; class ids start at 0.")
    if num_classes is not None and values.size and values[-1] >= num_classes:
        hint = " (for a 0/255 binary mask pass binary=True)" if values[-1] == 255 else ""
        raise ValueError(
            f"Mask file {path} holds class id {values[-1]}, but num_classes is {num_classes}{hint}."
        )
    return a.astype(np.uint8 if (not values.size or values[-1] <= 255) else np.int64)


def load_image(path):
    """Read an image file (TIFF or PNG) as float32 (H, W) in [0, 1]."""
    path = os.fspath(path)
    return to_float_image(read_array(path), path)


def load_mask(path, binary=False, num_classes=None):
    """Read a mask file (TIFF or PNG) as integer class ids (H, W); see ``to_class_ids``."""
    path = os.fspath(path)
    return to_class_ids(read_array(path), path, binary=binary, num_classes=num_classes)


def check_same_size(image, mask, image_path, mask_path):
    """Raise a ValueError naming both files when image (H, W[, C]) and mask (H, W) differ in size."""
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(
            f"Image {image_path} is {image.shape[0]}x{image.shape[1]} (HxW) but its mask {mask_path} is "
            f"{mask.shape[0]}x{mask.shape[1]}; an image and its mask must have the same size."
        )


# ----------------------------------------------------------------------------- images/ + masks/ layout


def _list_image_files(folder):
    """Map stem -> path for the TIFF/PNG files in one folder (hidden files skipped)."""
    found = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            continue  # README.txt, Thumbs.db, ...: not data
        if stem in found:
            raise ValueError(
                f"Files {found[stem]} and {entry.path} share the stem '{stem}'; keep one file per stem."
            )
        found[stem] = entry.path
    return found


def find_folder_samples(root, images="images", masks="masks", require_masks=True):
    """List the (image, mask) pairs of an ``images/`` + ``masks/`` folder.

    root: folder holding the two sub-folders (their names given by ``images`` and ``masks``).
    Images and masks are paired by file stem (``a.png`` <-> ``a.png`` or ``a.tif``).
    require_masks=False allows a missing ``masks/`` folder (unlabelled data; mask_path None).
    Returns a list of Sample(image_path, mask_path, subject=stem, n=None), sorted by stem.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Data folder {root} does not exist.")
    image_dir, mask_dir = root / images, root / masks
    if not image_dir.is_dir():
        raise FileNotFoundError(f"Data folder {root} has no '{images}' folder; put the images in {image_dir}.")
    image_files = _list_image_files(image_dir)
    if not image_files:
        raise ValueError(f"Image folder {image_dir} holds no {'/'.join(IMAGE_SUFFIXES)} files.")
    if not mask_dir.is_dir():
        if require_masks:
            raise FileNotFoundError(f"Data folder {root} has no '{masks}' folder; put the masks in {mask_dir}.")
        return [Sample(path, None, stem, None) for stem, path in image_files.items()]
    mask_files = _list_image_files(mask_dir)
    for stem, path in mask_files.items():
        if stem not in image_files:
            raise ValueError(f"Mask {path} has no image with the stem '{stem}' in {image_dir}.")
    samples = []
    for stem, path in image_files.items():
        if stem not in mask_files:
            if require_masks:
                raise ValueError(f"Image {path} has no mask with the stem '{stem}' in {mask_dir}.")
            samples.append(Sample(path, None, stem, None))
        else:
            samples.append(Sample(path, mask_files[stem], stem, None))
    return samples


def load_folder_sample(sample, num_classes=None, binary=False):
    """Load one folder Sample -> (image float32 (H, W) in [0, 1], mask (H, W) class ids or None)."""
    image = load_image(sample.image_path)
    if sample.mask_path is None:
        return image, None
    mask = load_mask(sample.mask_path, binary=binary, num_classes=num_classes)
    check_same_size(image, mask, sample.image_path, sample.mask_path)
    return image, mask


class ImageMaskFolder:
    """A user's own ``root/images`` + ``root/masks`` data set.

    data = ImageMaskFolder(root, num_classes=3)
    data.samples                      list of Sample, sorted by stem
    data.load(sample)                 -> (image float32 (H, W), mask uint8/int64 (H, W))
    data.split(val_fraction, seed)    -> (train samples, validation samples)

    num_classes: when given, masks holding larger ids are rejected with a clear error.
    binary: masks are 0/255 (or 0/1) foreground masks, loaded as {0, 1}.
    """

    def __init__(self, root, images="images", masks="masks", num_classes=None, binary=False,
                 require_masks=True):
        self.root = Path(root)
        self.num_classes = num_classes
        self.binary = binary
        self.samples = find_folder_samples(root, images, masks, require_masks=require_masks)

    def __len__(self):
        return len(self.samples)

    def load(self, sample):
        """Sample -> (image float32 (H, W) in [0, 1], mask (H, W) class ids or None)."""
        return load_folder_sample(sample, num_classes=self.num_classes, binary=self.binary)

    def split(self, val_fraction=0.2, seed=0):
        """Split by subject (here: by file stem); see ``seg.data.split_by_subject``."""
        from .kaggle import split_by_subject

        return split_by_subject(self.samples, val_fraction, seed)
