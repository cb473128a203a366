"""Tensor factories: zeros, ones, full, empty, arange, linspace, randn, rand, randint, the
*_like forms, and from_numpy / as_tensor (which share memory with the array they get).

As in PyTorch, a size may be given as separate ints or one tuple (`zeros(2, 3)` or
`zeros((2, 3))`), floating results are float32 unless `dtype=` says otherwise, and
`device=` ("cpu" or "gpu") chooses where the array is made, with no host-to-device copy.
"""
import numpy

from . import backend, dtypes
from . import random as _random
from .tensor import Tensor, _as_array


def _size(size):
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    for n in size:
        if isinstance(n, bool) or not isinstance(n, (int, numpy.integer)) or n < 0:
            raise ValueError(f"sizes must be non-negative integers, got {tuple(size)}.")
    return tuple(int(n) for n in size)


def _dtype(dtype):
    # An explicit None test, not `dtype or ...`: older NumPy made dtypes without fields falsy.
    return numpy.float32 if dtype is None else dtypes.resolve(dtype)


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
    dtype = dtypes.resolve(dtype)
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
    dtype = dtypes.resolve(dtype)
    xp = backend.array_module(device)
    return _make(xp.arange(start, end, step, dtype=dtype), requires_grad)


def linspace(start, end, steps, dtype=None, device=None, requires_grad=False):
    """`steps` evenly spaced values from start to end, both included (float32 by default)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, numpy.integer)) or steps < 0:
        raise ValueError(f"linspace() needs a non-negative integer number of steps, got {steps!r}.")
    xp = backend.array_module(device)
    return _make(xp.linspace(start, end, int(steps), dtype=_dtype(dtype)), requires_grad)


def from_numpy(array):
    """A tensor sharing memory with a NumPy array, keeping its dtype (float64 stays float64),
    as torch.from_numpy: writes to one show in the other."""
    if not isinstance(array, numpy.ndarray):
        raise TypeError(f"from_numpy() needs a numpy.ndarray, got {type(array).__name__}; use "
                        "minidl.tensor() for lists and numbers.")
    return Tensor._wrap(array)


def as_tensor(data, dtype=None, device=None):
    """data as a tensor, sharing memory when it already is an array of that dtype and device
    (torch.as_tensor); a Tensor comes back as itself in that case."""
    if isinstance(data, Tensor):
        dtype = dtypes.resolve(dtype)
        same_dtype = dtype is None or data.dtype == dtype
        same_device = device is None or backend.normalize_device(device) == data.device
        return data if same_dtype and same_device else data.to(device=device, dtype=dtype)
    return Tensor._wrap(_as_array(data, dtype, device))


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
