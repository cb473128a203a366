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


def _expand(g, shape, axes, keepdims):
    """Re-insert the reduced axes so g broadcasts against the input."""
    if not keepdims:
        for a in axes:
            g = backend.get_array_module(g).expand_dims(g, a)
    return g


class Sum(Function):
    def forward(self, x):
        self.shape = x.shape
        self.axes = _normalize_axis(self.axis, x.ndim)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return xp.broadcast_to(_expand(gy, self.shape, self.axes, self.keepdims), self.shape)


class Mean(Function):
    def forward(self, x):
        self.shape = x.shape
        self.axes = _normalize_axis(self.axis, x.ndim)
        self.count = 1
        for a in self.axes:
            self.count *= x.shape[a]
        return x.mean(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        g = _expand(gy, self.shape, self.axes, self.keepdims) / gy.dtype.type(self.count)
        return xp.broadcast_to(g, self.shape)


class Max(Function):
    """max (or min) over axes; tied extremes share the gradient equally."""
    take_max = True

    def forward(self, x):
        self.axes = _normalize_axis(self.axis, x.ndim)
        if x.size == 0:
            raise ValueError("max()/min() of an empty tensor is undefined.")
        y = x.max(axis=self.axes, keepdims=True) if self.take_max else x.min(axis=self.axes, keepdims=True)
        self.hits = x == y
        return y if self.keepdims else y.squeeze(axis=self.axes)

    def backward(self, gy):
        hits = self.hits
        g = _expand(gy, hits.shape, self.axes, self.keepdims)
        count = hits.sum(axis=self.axes, keepdims=True)
        return hits * (g / count.astype(gy.dtype))


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
