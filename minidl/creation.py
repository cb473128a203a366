"""Tensor factories: zeros, ones, full, empty, arange, randn, rand, randint and the *_like forms.

As in PyTorch, a size may be given as separate ints or one tuple (`zeros(2, 3)` or
`zeros((2, 3))`), floating results are float32 unless `dtype=` says otherwise, and
`device=` ("cpu" or "gpu") chooses where the array is made, with no host-to-device copy.
"""
import numpy

from . import backend
from . import random as _random
from .tensor import Tensor


def _size(size):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    for n in size:
        if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)) or n < 0:
            raise ValueError(f"sizes must be non-negative integers, got {tuple(size)}.")
    return tuple(int(n) for n in size)


def _dtype(dtype):
    # An explicit None test, not `dtype or ...`: older NumPy made dtypes without fields falsy.
    return numpy.float32 if dtype is None else dtype


def _make(array, requires_grad):
    t = Tensor._wrap(array)
    if requires_grad:
        t.requires_grad_(True)
        if t.dtype.kind not in "fc":
            raise TypeError(f"only floating-point tensors can require gradients, got dtype {t.dtype}.")
    return t


def zeros(*size, dtype=None, device=None, requires_grad=False):
    """A tensor of zeros. zeros(2, 3) or zeros((2, 3))."""
    xp = backend.array_module(device)
    return _make(xp.zeros(_size(size), dtype=_dtype(dtype)), requires_grad)


def ones(*size, dtype=None, device=None, requires_grad=False):
    xp = backend.array_module(device)
    return _make(xp.ones(_size(size), dtype=_dtype(dtype)), requires_grad)


def empty(*size, dtype=None, device=None, requires_grad=False):
    """Uninitialised values: fill them before reading."""
    xp = backend.array_module(device)
    return _make(xp.empty(_size(size), dtype=_dtype(dtype)), requires_grad)


def full(size, fill_value, dtype=None, device=None, requires_grad=False):
    """A tensor of `size` holding fill_value (dtype from the value when not given, float32 for floats)."""
    if dtype is None:
        dtype = (numpy.bool_ if isinstance(fill_value, bool) else
                 numpy.int64 if isinstance(fill_value, int) else numpy.float32)
    size = _size(size if isinstance(size, (tuple, list)) else (size,))
    xp = backend.array_module(device)
    return _make(xp.full(size, fill_value, dtype=dtype), requires_grad)


def arange(start, end=None, step=1, dtype=None, device=None, requires_grad=False):
    """Values start, start + step, ... below end; int64 when all of them are ints, else float32."""
    if end is None:
        start, end = 0, start
    if step == 0:
        raise ValueError("arange() needs a non-zero step.")
    if dtype is None:
        ints = all(isinstance(v, (int, numpy.integer)) for v in (start, end, step))
        dtype = numpy.int64 if ints else numpy.float32
    xp = backend.array_module(device)
    return _make(xp.arange(start, end, step, dtype=dtype), requires_grad)


def randn(*size, dtype=None, device=None, requires_grad=False):
    """Standard normal samples, from minidl.random's generator for `device`."""
    xp = backend.array_module(device)
    return _make(_random.normal(xp, _size(size), dtype=dtype), requires_grad)


def rand(*size, dtype=None, device=None, requires_grad=False):
    """Uniform samples from [0, 1)."""
    xp = backend.array_module(device)
    return _make(_random.uniform(xp, _size(size), dtype=dtype), requires_grad)


def randint(low, high=None, size=(), dtype=None, device=None):
    """Integers uniform in [low, high) (int64); randint(high, size=...) starts at 0."""
    if high is None:
        low, high = 0, low
    if high <= low:
        raise ValueError(f"randint() needs low < high, got low={low}, high={high}.")
    xp = backend.array_module(device)
    size = _size(size if isinstance(size, (tuple, list)) else (size,))
    return _make(_random.integers(xp, low, high, size, dtype=numpy.int64 if dtype is None else dtype), False)


def _like(t, dtype, device):
    data = t.data if isinstance(t, Tensor) else t
    return (tuple(data.shape), data.dtype if dtype is None else dtype,
            device if device is not None else backend.device_of(data))


def zeros_like(t, dtype=None, device=None, requires_grad=False):
    """Zeros with t's shape, dtype and device (each can be overridden)."""
    shape, dtype, device = _like(t, dtype, device)
    return zeros(shape, dtype=dtype, device=device, requires_grad=requires_grad)


def ones_like(t, dtype=None, device=None, requires_grad=False):
    shape, dtype, device = _like(t, dtype, device)
    return ones(shape, dtype=dtype, device=device, requires_grad=requires_grad)


def full_like(t, fill_value, dtype=None, device=None, requires_grad=False):
    shape, dtype, device = _like(t, dtype, device)
    return full(shape, fill_value, dtype=dtype, device=device, requires_grad=requires_grad)


def randn_like(t, dtype=None, device=None, requires_grad=False):
    shape, dtype, device = _like(t, dtype, device)
    return randn(shape, dtype=dtype, device=device, requires_grad=requires_grad)


def rand_like(t, dtype=None, device=None, requires_grad=False):
    shape, dtype, device = _like(t, dtype, device)
    return rand(shape, dtype=dtype, device=device, requires_grad=requires_grad)
