"""Hypothesis strategies and helpers shared by the test files.

    shapes(...)                      array shapes (small sides, so gradchecks stay fast)
    broadcastable_shape_pairs(...)   (shape_a, shape_b) that broadcast together
    float64_arrays(shape, ...)       float64 arrays whose values keep a margin from kinks
                                     (0 for relu/abs, clip bounds, ...), optionally positive,
                                     optionally laid out non-contiguously
    check_grad(fn, *arrays)          minidl.gradcheck on float64 tensors made from the arrays

Values are drawn by a NumPy generator seeded by hypothesis: hypothesis explores shapes and
seeds, and the values are continuous, so ties (where max/min have no derivative) do not occur.
"""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import minidl


def shapes(min_dims=0, max_dims=3, min_side=1, max_side=4):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def broadcastable_shape_pairs(min_dims=0, max_dims=3, min_side=1, max_side=4):
    """Pairs of shapes that broadcast against each other, size-1 axes included."""
    return hnp.mutually_broadcastable_shapes(
        num_shapes=2, min_dims=min_dims, max_dims=max_dims, min_side=min_side,
        max_side=max_side).map(lambda r: tuple(r.input_shapes))


def values(seed, shape, low=0.1, high=2.0, positive=False, away_from=(), margin=0.1):
    """float64 array of `shape`: |v| in [low, high] (with a random sign unless positive),
    and at least `margin` from every point in away_from."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(low, high, size=shape)
    if not positive:
        v = v * rng.choice([-1.0, 1.0], size=shape)
    for k in away_from:
        close = np.abs(v - k) < margin
        v = np.where(close, k + np.copysign(margin, v - k), v)
    return np.asarray(v, dtype=np.float64)


def non_contiguous(a):
    """The same values as a, viewed with a stride of 2 on the last axis (not C-contiguous)."""
    if a.ndim == 0:
        return a
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    big[..., ::2] = a
    view = big[..., ::2]
    assert not view.flags.c_contiguous or a.size <= 1
    return view


def float64_arrays(shape, low=0.1, high=2.0, positive=False, away_from=(), margin=0.1,
                   layouts=("contiguous", "strided")):
    """Strategy for float64 arrays of `shape` (see `values`), contiguous or strided."""
    return st.builds(
        lambda seed, layout: (non_contiguous if layout == "strided" else np.ascontiguousarray)(
            values(seed, shape, low, high, positive, away_from, margin)),
        st.integers(0, 2 ** 32 - 1), st.sampled_from(layouts))


def check_grad(fn, *arrays, **kwargs):
    """gradcheck fn at the given float64 arrays (each becomes a Tensor with requires_grad).

    The arrays are used in place (a strided view stays strided), and restored afterwards.
    """
    tensors = [minidl.tensor(np.asarray(a, dtype=np.float64), requires_grad=True) for a in arrays]
    return minidl.gradcheck(fn, tensors, **kwargs)
