"""minidl/allocator.py: the glibc settings that let a training step reuse freed memory."""
import ctypes
import sys

import numpy as np
import pytest

from minidl import allocator


def test_opting_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("MINIDL_MALLOC", "default")
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_thresholds_are_accepted_on_linux(monkeypatch):
    monkeypatch.delenv("MINIDL_MALLOC", raising=False)
    try:
        ctypes.CDLL(None).mallopt
    except AttributeError:
        pytest.skip("this C library has no mallopt (not glibc)")
    assert allocator.keep_freed_memory() is True
    # Big arrays still allocate, fill and free normally afterwards.
    a = np.ones(allocator.MMAP_THRESHOLD // 64, dtype=np.float32)
    assert float(a[-1]) == 1.0
    del a
