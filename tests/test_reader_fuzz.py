"""Fuzzing the file readers: empty, random, truncated and corrupted files named .tif/.tiff/.png.

Every reader either returns what it documents or raises one of its documented errors
(ValueError, FileNotFoundError) with the file's name in the message: never another exception
type from tifffile, Pillow, zlib or NumPy, and never a message that leaves the user guessing.
"""
import io
import os
import re
import struct

import numpy as np
import pytest
import tifffile
from hypothesis import given, strategies as st
from PIL import Image

from seg.data import headers, readers

SUFFIXES = (".tif", ".tiff", ".png")
DOCUMENTED = (ValueError, FileNotFoundError)

# Every file is written under this many names; one folder per test run is enough.
_counter = iter(range(10 ** 9))


def valid_file_bytes(suffix, array):
    """A real TIFF/PNG file holding `array`, as bytes."""
    buffer = io.BytesIO()
    if suffix == ".png":
        Image.fromarray(array).save(buffer, format="PNG")
    else:
        tifffile.imwrite(buffer, array, compression="zlib" if array.size % 2 else None)
    return buffer.getvalue()


@st.composite
def small_arrays(draw, min_side=1):
    h, w = draw(st.integers(min_side, 9)), draw(st.integers(min_side, 9))
    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    channels = draw(st.sampled_from([1, 3])) if dtype == np.uint8 else 1
    shape = (h, w) if channels == 1 else (h, w, channels)
    seed = draw(st.integers(0, 2 ** 16))
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


@st.composite
def damaged_files(draw):
    """(suffix, content): empty, random bytes, or a real file cut short or overwritten in part."""
    suffix = draw(st.sampled_from(SUFFIXES))
    kind = draw(st.sampled_from(["empty", "random", "truncated", "corrupted"]))
    if kind == "empty":
        return suffix, b""
    if kind == "random":
        return suffix, draw(st.binary(min_size=1, max_size=300))
    good = valid_file_bytes(".png" if suffix == ".png" else ".tif", draw(small_arrays()))
    if kind == "truncated":
        return suffix, good[: draw(st.integers(0, len(good) - 1))]
    start = draw(st.integers(0, len(good) - 1))
    patch = draw(st.binary(min_size=1, max_size=16))
    return suffix, good[:start] + patch + good[start + len(patch):]


def check_reader(fn, path, check_result):
    try:
        result = fn(path)
    except DOCUMENTED as exc:
        assert str(path) in str(exc), f"{fn.__name__}: the message does not name the file: {exc}"
        return
    except Exception as exc:     # any other type is the bug this test looks for
        raise AssertionError(f"{fn.__name__} raised {type(exc).__name__}: {exc}") from exc
    check_result(result)


def check_image(image):
    assert image.dtype == np.float32 and image.ndim == 2
    assert np.all(np.isfinite(image)) and image.min() >= 0 and image.max() <= 1


def check_mask(mask):
    assert mask.ndim == 2 and np.issubdtype(mask.dtype, np.integer) and mask.min() >= 0


def check_header(header):
    assert len(header.shape) == 2 and header.channels >= 1


@given(damaged_files())
def test_readers_raise_only_documented_errors_naming_the_file(tmp_path_factory, damaged):
    suffix, content = damaged
    folder = tmp_path_factory.getbasetemp() / "fuzz"
    folder.mkdir(exist_ok=True)
    path = folder / f"frame{next(_counter)}{suffix}"
    path.write_bytes(content)
    try:
        check_reader(readers.read_array, path, lambda a: None)
        check_reader(readers.load_image, path, check_image)
        check_reader(lambda p: readers.load_mask(p, binary=False), path, check_mask)
        check_reader(lambda p: readers.load_mask(p, binary=True), path, check_mask)
        check_reader(headers.read_header, path, check_header)
    finally:
        os.remove(path)


@given(small_arrays(min_side=2), st.sampled_from(SUFFIXES))   # a 1-pixel side is squeezed away
def test_header_agrees_with_the_pixels(tmp_path_factory, array, suffix):
    """On intact files the header tells the size and channels that reading the pixels gives."""
    folder = tmp_path_factory.getbasetemp() / "fuzz"
    folder.mkdir(exist_ok=True)
    path = folder / f"good{next(_counter)}{suffix}"
    path.write_bytes(valid_file_bytes(".png" if suffix == ".png" else ".tif", array))
    try:
        stored = readers.read_array(path)
        header = headers.read_header(path)
        squeezed = np.squeeze(stored)
        channels = squeezed.shape[2] if squeezed.ndim == 3 else 1
        assert header.channels == channels and header.dtype == stored.dtype
        assert header.shape == tuple(d for d in stored.shape if d != 1)[:2]
    finally:
        os.remove(path)


def claim_size(path, width, height):
    """Rewrite a TIFF's ImageWidth/ImageLength tags in place (a corrupted header)."""
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        places = [(tags[name].valueoffset, tags[name].dtype) for name in ("ImageWidth", "ImageLength")]
    raw = bytearray(path.read_bytes())
    for (offset, dtype), value in zip(places, (width, height)):
        fmt = "<I" if dtype == 4 else "<H"          # LONG or SHORT
        raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_header_claiming_a_huge_image_is_refused_before_allocating(tmp_path, compression):
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint8), compression=compression, rowsperstrip=4)
    claim_size(path, 60000, 60000)                  # 3.4 GiB of pixels from a file of ~200 bytes
    for reader in (readers.read_array, readers.load_image, headers.read_header):
        with pytest.raises(ValueError, match=re.escape(str(path)) + " is damaged: its header describes"):
            reader(path)
