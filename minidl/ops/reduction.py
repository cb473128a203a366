"""Reductions over axes: sum, mean, max, min (NumPy's `axis` / `keepdims`)."""
import builtins

from .. import backend
from ..function import Function


def _normalize_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions.")
    return tuple(sorted(a % builtins.max(ndim, 1) for a in axes))


def _kept_shape(shape, axes):
    """The reduced shape with the reduced axes kept as length 1 (what keepdims=True gives)."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


def _spread(g, kept, shape):
    """g (the reduced shape) copied back over the reduced axes: (kept) -> (shape).

    A new array rather than numpy.broadcast_to's view: broadcast_to's Python-level checks
    cost more than the copy for every small tensor, and a big reduction's gradient is read
    in full by the next backward anyway.
    """
    out = backend.get_array_module(g).empty(shape, dtype=g.dtype)
    out[...] = g.reshape(kept)
    return out


class Sum(Function):
    def forward(self, x):
        self.shape = x.shape
        if self.axis is None:       # the common case (a loss), without the axis bookkeeping
            self.kept = (1,) * x.ndim
            return x.sum(keepdims=self.keepdims)
        axes = _normalize_axis(self.axis, x.ndim)
        self.kept = _kept_shape(x.shape, axes)
        return x.sum(axis=axes, keepdims=self.keepdims)

    def backward(self, gy):
        # Every input element contributed once.
        return _spread(gy, self.kept, self.shape)


class Mean(Function):
    def forward(self, x):
        self.shape = x.shape
        axes = _normalize_axis(self.axis, x.ndim)
        self.kept = _kept_shape(x.shape, axes)
        self.count = 1
        for a in axes:
            self.count *= x.shape[a]
        if x.dtype.kind != "f":
            return x.mean(axis=axes, keepdims=self.keepdims)
        # sum / count: the same value as x.mean (both sum pairwise), without mean's Python overhead
        total = x.sum(axis=axes, keepdims=self.keepdims)
        return total / total.dtype.type(self.count)

    def backward(self, gy):
        return _spread(gy / gy.dtype.type(self.count), self.kept, self.shape)


class Max(Function):
    """max (or min) over axes; tied extremes share the gradient equally."""
    take_max = True

    def forward(self, x):
        self.axes = _normalize_axis(self.axis, x.ndim)
        if x.size == 0:
            raise ValueError("max()/min() of an empty tensor is undefined.")
        y = x.max(axis=self.axes, keepdims=True) if self.take_max else x.min(axis=self.axes, keepdims=True)
        self.hits = x == y
        return y if self.keepdims else y.reshape(_squeezed(y.shape, self.axes))

    def backward(self, gy):
        hits = self.hits
        count = hits.sum(axis=self.axes, keepdims=True)
        return hits * (gy.reshape(count.shape) / count.astype(gy.dtype))


def _squeezed(shape, axes):
    return tuple(n for i, n in enumerate(shape) if i not in axes)


class Min(Max):
    take_max = False


def sum(x, axis=None, keepdims=False):  # noqa: A001 - mirrors torch.sum
    return Sum.apply(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis=axis, keepdims=keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return Max.apply(x, axis=axis, keepdims=keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return Min.apply(x, axis=axis, keepdims=keepdims)
