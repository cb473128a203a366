"""Reading one image or mask file (TIFF or PNG) into the arrays the networks use.

- ``read_array(path)``  the raw array stored in a TIFF (tifffile) or PNG (Pillow) file;
- ``load_image(path)``  -> float32 (H, W) in [0, 1], the network input ((H, W, 3) with channels=3);
- ``image_channels(path)`` -> 3 for a colour file, 1 for a gray one (read from the header only);
- ``load_mask(path)``   -> integer class ids (H, W), the training target;
- ``to_float_image`` / ``to_class_ids``: the same conversions for arrays already in memory.

Every bad input raises one clear sentence that names the offending file: FileNotFoundError for
a missing file, ValueError for anything else (a damaged file, a file of another type, values
the conversion cannot take); tests/test_reader_fuzz.py feeds them damaged files to check it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading

import numpy as np

__all__ = [
    "IMAGE_SUFFIXES",
    "read_array",
    "to_float_image",
    "to_class_ids",
    "load_image",
    "load_mask",
    "image_channels",
    "check_same_size",
]

#: File types the readers understand (lower-case suffixes).
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


# ----------------------------------------------------------------------------- raw file reading


#: A TIFF whose header promises more than this many decoded bytes, and more than deflate's
#: largest ratio (about 1032:1) allows from the bytes it stores, is refused as damaged before
#: anything is allocated: a corrupted header must not exhaust the memory.
MAX_DECODED_BYTES = 256 << 20
MAX_COMPRESSION_RATIO = 1100


class _WhileReading(logging.Filter):
    """Drops tifffile's log lines in a thread while the readers read a file there: for a damaged
    file the ValueError they raise says it in one sentence, without a screenful of warnings."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record):
        return not getattr(self.local, "reading", False)


_QUIET = _WhileReading()
logging.getLogger("tifffile").addFilter(_QUIET)


@contextlib.contextmanager
def quiet_tifffile():
    """Within the block (in this thread), tifffile logs nothing."""
    before = getattr(_QUIET.local, "reading", False)
    _QUIET.local.reading = True
    try:
        yield
    finally:
        _QUIET.local.reading = before


def damaged_file_error(path, kind, exc):
    """The ValueError for a file that tifffile or Pillow (`kind`: "TIFF" or "PNG") could not parse."""
    return ValueError(f"Could not read {kind} file {path} ({str(exc) or type(exc).__name__}); the file is "
                      f"damaged or not a {kind}.")


def tiff_size_problem(tif, path):
    """A sentence if the header of an open tifffile.TiffFile promises pixel data that the file
    cannot hold (cut short, or sizes no real file has); None when the sizes are plausible."""
    size = tif.filehandle.size
    for page in tif.pages:
        stored = sum(page.databytecounts)
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            return (f"TIFF file {path} is truncated: its header promises {max(ends)} bytes but the file "
                    f"has {size}; copy the file again.")
        values = math.prod(page.shape)
        if page.compression == 1 and stored * 8 < values * page.bitspersample:   # 1: uncompressed
            return (f"TIFF file {path} is damaged: its header describes {page.shape} pixels of "
                    f"{page.bitspersample} bits but the file stores {stored} bytes of them.")
        decoded = values * np.dtype(page.dtype or np.uint8).itemsize
        if decoded > max(MAX_DECODED_BYTES, MAX_COMPRESSION_RATIO * stored):
            return (f"TIFF file {path} is damaged: its header describes {page.shape} pixels "
                    f"({decoded / 2**30:.1f} GiB) stored in {stored} bytes.")
    return None


def _read_tiff(path):
    import tifffile

    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tif:
            problem = tiff_size_problem(tif, path)
            if problem is None:
                return tif.asarray()       # what tifffile.imread(path) returns
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file {path} does not exist.") from None
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise damaged_file_error(path, "TIFF", exc) from exc
    raise ValueError(problem)


def _read_png(path):
    from PIL import Image

    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file {path} does not exist.")
    try:
        with Image.open(path) as im:
            mode = im.mode
            # np.array copies the pixels while the file is still open. Palette ('P') images
            # give their palette indices, which is what VOC-style masks store.
            a = np.array(im)
    except Exception as exc:
        raise damaged_file_error(path, "PNG", exc) from exc
    if mode.startswith("I") and a.dtype != np.uint16 and a.size and 0 <= a.min() and a.max() <= 65535:
        a = a.astype(np.uint16)  # Pillow opens some 16-bit PNGs as 32-bit 'I' mode
    return a


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


def to_float_image(a, path="<array>", channels=1):
    """Convert a stored image array to float32 in [0, 1]: (H, W) for channels=1, (H, W, 3) for 3.

    uint8 is divided by 255 and uint16 by 65535 (their full ranges). Other dtypes have no
    standard scale: they are kept if already in [0, 1], else min-max stretched to [0, 1].
    channels=1: RGB(A) is turned into gray with the ITU-R BT.601 luminance weights 0.299,
    0.587, 0.114. channels=3: RGB is kept, a gray image is repeated in the three channels.
    Alpha is ignored either way.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels!r}.")
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
    if channels == 3:
        x = x[..., :3] if x.ndim == 3 else np.repeat(x[..., None], 3, axis=-1)
    elif x.ndim == 3:
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


def load_image(path, channels=1):
    """Read an image file (TIFF or PNG) as float32 in [0, 1]: (H, W), or (H, W, 3) for channels=3."""
    path = os.fspath(path)
    return to_float_image(read_array(path), path, channels)


def image_channels(path):
    """3 when the file stores a colour (RGB or RGBA) image, else 1; only the header is read.

    The same rule as ``to_float_image``: after dropping size-1 axes, a last axis of 3 or 4 is
    colour. Palette PNGs count as gray (their pixels are palette indices, as in VOC masks).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix == ".png":
            from PIL import Image

            with Image.open(path) as im:
                return 3 if im.mode in ("RGB", "RGBA", "RGBX") else 1
        import tifffile

        with quiet_tifffile(), tifffile.TiffFile(path) as tif:     # a damaged file: our sentence only
            shape = tuple(n for n in tif.pages[0].shape if n != 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file {path} does not exist.") from None
    except Exception as exc:
        raise ValueError(f"Could not read image file {path} ({exc}); the file is damaged.") from exc
    return 3 if len(shape) == 3 and shape[-1] in (3, 4) else 1


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
