"""Random numbers for minidl: one generator per device, seeded together by `manual_seed`.

Every random draw in minidl (weight initialisation, dropout masks, `randn`, ...) goes
through `generator(xp)`, so `minidl.manual_seed(0)` makes a run repeatable.

    cpu  a numpy.random.Generator (PCG64)
    gpu  a cupy.random.RandomState, created the first time it is asked for, so a
         CPU-only run never imports CuPy; it gets the last seed given to manual_seed.

The two devices draw different streams: the same seed gives repeatable, not identical,
numbers on CPU and GPU. Use `uniform(xp, ...)`, `normal(xp, ...)` and `integers(xp, ...)`
rather than the generator's own methods; they hide the small API differences.
"""
import sys

import numpy

_seed = None         # the last manual_seed, or None for fresh OS entropy
_generators = {}     # "numpy" / "cupy" -> generator


def manual_seed(seed):
    """Seed the generators of every device (like torch.manual_seed). seed: a non-negative int."""
    global _seed
    if isinstance(seed, bool) or not isinstance(seed, (int, numpy.integer)) or seed < 0:
        raise ValueError(f"manual_seed() needs a non-negative integer, got {seed!r}.")
    _seed = int(seed)
    _generators["numpy"] = numpy.random.default_rng(_seed)
    # Reseed CuPy now only if it is already loaded; otherwise `generator` does it lazily.
    _generators.pop("cupy", None)
    if "cupy" in sys.modules:
        try:
            _generators["cupy"] = _make_cupy_generator(sys.modules["cupy"])
        except Exception:   # CuPy imported but no usable GPU: nothing to seed
            pass
    return _seed


def initial_seed():
    """The seed given to the last manual_seed, or None if the generators use OS entropy."""
    return _seed


def _make_cupy_generator(cupy):
    return cupy.random.RandomState(_seed)


def generator(xp=numpy):
    """The generator for the array module `xp` (numpy or cupy)."""
    name = xp.__name__
    gen = _generators.get(name)
    if gen is None:
        gen = numpy.random.default_rng(_seed) if name == "numpy" else _make_cupy_generator(xp)
        _generators[name] = gen
    return gen


def _float_dtype(dtype):
    dtype = numpy.dtype(numpy.float32 if dtype is None else dtype)
    if dtype.kind != "f":
        raise TypeError(f"random floats need a floating dtype, got {dtype}.")
    return dtype


def uniform(xp, shape, low=0.0, high=1.0, dtype=numpy.float32):
    """Array of `shape` drawn uniformly from [low, high) on xp's device."""
    dtype = _float_dtype(dtype)
    draw_dtype = dtype if dtype in (numpy.float32, numpy.float64) else numpy.float32
    gen = generator(xp)
    if xp.__name__ == "numpy":
        u = gen.random(shape, dtype=draw_dtype)
    else:
        u = gen.random_sample(shape, dtype=draw_dtype)
    if low != 0.0 or high != 1.0:
        u = u * draw_dtype.type(high - low) + draw_dtype.type(low)
    return u.astype(dtype, copy=False)


def normal(xp, shape, mean=0.0, std=1.0, dtype=numpy.float32):
    """Array of `shape` drawn from N(mean, std^2) on xp's device."""
    dtype = _float_dtype(dtype)
    draw_dtype = dtype if dtype in (numpy.float32, numpy.float64) else numpy.float32
    z = generator(xp).standard_normal(shape, dtype=draw_dtype)
    if mean != 0.0 or std != 1.0:
        z = z * draw_dtype.type(std) + draw_dtype.type(mean)
    return z.astype(dtype, copy=False)


def integers(xp, low, high, shape, dtype=numpy.int64):
    """Array of `shape` with integers drawn uniformly from [low, high)."""
    gen = generator(xp)
    if xp.__name__ == "numpy":
        return gen.integers(low, high, size=shape, dtype=dtype)
    return gen.randint(low, high, size=shape, dtype=dtype)


def permutation(xp, n):
    """A random permutation of range(n) (e.g. to shuffle a data set)."""
    return generator(xp).permutation(n)
