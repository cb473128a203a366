"""What an image file holds, read from its header alone (no pixels are decoded).

    header = read_header("train/1_1.tif")     # Header(shape=(420, 580), channels=1, dtype=uint8)

Used by the data check (seg.data.check) and by `python -m seg predict` to look at thousands
of files in seconds: tifffile's ``TiffFile`` parses only the image file directories, Pillow's
``Image.open`` only the first chunks. Both catch what a header can show: a file that is not an
image, a stack of pages, an unusual channel count or dtype, and (TIFF) pixel data cut short by a
truncated copy. Damage inside compressed pixel data shows only when the pixels are decoded.

Errors are the readers' (seg.data.readers): FileNotFoundError or ValueError, naming the file.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from .readers import IMAGE_SUFFIXES, damaged_file_error, quiet_tifffile, tiff_size_problem

__all__ = ["Header", "read_header"]


class Header(NamedTuple):
    """shape: (H, W) of the image; channels: values per pixel (1 gray, 3 RGB, 4 RGBA, ...);
    dtype: the stored NumPy dtype of one value."""

    shape: tuple
    channels: int
    dtype: np.dtype


def _tiff_header(path):
    import tifffile

    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            page = series.pages[0] if series.pages else tif.pages[0]
            full_shape = tuple(series.shape)
            channels = int(page.samplesperpixel)
            dtype = np.dtype(page.dtype)
            problem = tiff_size_problem(tif, path)     # cut short, or impossible sizes
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file {path} does not exist.") from None
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
        raise damaged_file_error(path, "TIFF", exc) from None
    if problem is not None:
        raise ValueError(problem)
    return full_shape, channels, dtype


#: Pillow mode -> (dtype, channels) for the modes a PNG can open as.
_PNG_MODES = {"1": (np.bool_, 1), "L": (np.uint8, 1), "P": (np.uint8, 1), "LA": (np.uint8, 2),
              "PA": (np.uint8, 2), "RGB": (np.uint8, 3), "RGBA": (np.uint8, 4), "I": (np.int32, 1),
              "I;16": (np.uint16, 1), "I;16B": (np.uint16, 1), "F": (np.float32, 1)}


def _png_header(path):
    from PIL import Image

    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file {path} does not exist.")
    try:
        with Image.open(path) as im:
            mode, (width, height) = im.mode, im.size
            # verify() walks the chunks and their checksums without decompressing the pixels,
            # so a truncated or corrupted file shows here too.
            im.verify()
    except Exception as exc:
        raise damaged_file_error(path, "PNG", exc) from None
    if mode not in _PNG_MODES:
        raise ValueError(f"PNG file {path} has the unsupported pixel mode {mode!r}; save it as gray, "
                         "RGB or RGBA.")
    dtype, channels = _PNG_MODES[mode]
    return ((height, width) if channels == 1 else (height, width, channels)), channels, np.dtype(dtype)


def read_header(path):
    """Header(shape (H, W), channels, dtype) of a TIFF or PNG file, without decoding pixels.

    The shape follows the readers' rule (size-1 axes dropped): one 2-D image (H, W) or an
    image with channels last (H, W, C); anything else (a stack of pages) is a ValueError.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".tif", ".tiff"):
        full_shape, channels, dtype = _tiff_header(path)
    elif suffix == ".png":
        full_shape, channels, dtype = _png_header(path)
    else:
        raise ValueError(f"File {path} has an unsupported type; use one of {', '.join(IMAGE_SUFFIXES)}.")
    shape = tuple(d for d in full_shape if d != 1)
    if len(shape) == 2 and channels == 1:
        return Header(shape, 1, dtype)
    if len(shape) == 3 and shape[-1] == channels:
        return Header(shape[:2], channels, dtype)
    raise ValueError(f"Image file {path} holds an array of shape {full_shape}; expected one 2-D image "
                     "(H, W) or one image with channels last (H, W, C), not a stack of pages.")
