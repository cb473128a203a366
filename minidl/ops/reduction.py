"""Reductions over dims: sum, mean, max, min, amax, amin, argmax, argmin, var, std, norm.

The arguments are PyTorch's: `dim` (an int, a tuple of ints or None for every dim) and
`keepdim`. NumPy's names `axis` / `keepdims` are accepted as aliases, so code written
either way runs. As in PyTorch, `max(x, dim)` / `min(x, dim)` with one int dim return a
named pair `(values, indices)`, and the gradient goes to the element the index names;
without a dim they return the extreme value, and tied extremes share the gradient.
"""
import builtins
import collections

from .. import backend
from ..function import Function

# No import of Tensor or of the arithmetic ops here: the composites below (var, std, norm)
# are written with Tensor operators and methods, so this module adds no strand to the
# tensor.py <-> ops import knot (see the end of tensor.py).

# torch.return_types.max / min: a tuple that also has .values and .indices.
MaxResult = collections.namedtuple("max", ["values", "indices"])
MinResult = collections.namedtuple("min", ["values", "indices"])


def resolve_dim(name, dim, keepdim, axis=None, keepdims=None):
    """(dim, keepdim) from PyTorch's names or NumPy's aliases; naming both is an error."""
    if axis is not None:
        if dim is not None:
            raise TypeError(f"{name}() got both dim and axis; pass only dim (axis is NumPy's "
                            "name for it).")
        dim = axis
    if keepdims is not None:
        keepdim = keepdims
    if isinstance(dim, list):
        dim = tuple(dim)
    return dim, bool(keepdim)


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


class MaxAlongDim(Function):
    """max (or min) along one dim with the index of the winner (torch.max(x, dim)).

    Ties: the first extreme wins the index (NumPy's argmax rule) and all of the gradient,
    as the index says which element the value came from.
    """
    take_max = True

    def forward(self, x):
        xp = backend.get_array_module(x)
        if x.shape[self.dim] == 0:
            raise ValueError(f"max()/min() along dim {self.dim} of length 0 is undefined.")
        idx = (x.argmax(axis=self.dim) if self.take_max else x.argmin(axis=self.dim)).astype("int64")
        self.idx, self.shape = xp.expand_dims(idx, self.dim), x.shape
        self.indices = self.idx if self.keepdim else idx
        y = xp.take_along_axis(x, self.idx, axis=self.dim)
        return y if self.keepdim else y.squeeze(self.dim)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        gx = xp.zeros(self.shape, dtype=gy.dtype)
        xp.put_along_axis(gx, self.idx, gy.reshape(self.idx.shape), axis=self.dim)
        return gx


class MinAlongDim(MaxAlongDim):
    take_max = False


def sum(x, dim=None, keepdim=False, *, axis=None, keepdims=None):  # noqa: A001 - mirrors torch.sum
    """Sum over `dim` (int, tuple or None for all). x: any shape."""
    dim, keepdim = resolve_dim("sum", dim, keepdim, axis, keepdims)
    return Sum.apply(x, axis=dim, keepdims=keepdim)


def mean(x, dim=None, keepdim=False, *, axis=None, keepdims=None):
    dim, keepdim = resolve_dim("mean", dim, keepdim, axis, keepdims)
    return Mean.apply(x, axis=dim, keepdims=keepdim)


def amax(x, dim=None, keepdim=False, *, axis=None, keepdims=None):
    """The largest value over `dim` (int, tuple or None); tied maxima share the gradient."""
    dim, keepdim = resolve_dim("amax", dim, keepdim, axis, keepdims)
    return Max.apply(x, axis=dim, keepdims=keepdim)


def amin(x, dim=None, keepdim=False, *, axis=None, keepdims=None):
    dim, keepdim = resolve_dim("amin", dim, keepdim, axis, keepdims)
    return Min.apply(x, axis=dim, keepdims=keepdim)


def _extreme(name, x, dim, keepdim, axis, keepdims, along, whole, result):
    if hasattr(dim, "shape"):   # torch.max(a, b): the element-wise maximum
        return x.maximum(dim) if name == "max" else x.minimum(dim)
    dim, keepdim = resolve_dim(name, dim, keepdim, axis, keepdims)
    if dim is None or isinstance(dim, tuple):
        return whole.apply(x, axis=dim, keepdims=keepdim)
    (d,) = _normalize_axis(dim, x.ndim)
    op = along(dim=d, keepdim=keepdim)
    values = op(x)
    # The op found the indices on its way; they leave the graph as an int64 tensor.
    return result(values, values._wrap(op.indices))


def max(x, dim=None, keepdim=False, *, axis=None, keepdims=None):  # noqa: A001
    """max(x): the largest value. max(x, dim): the pair (values, indices) along one dim.
    max(x, other_tensor): the element-wise maximum (as torch.max)."""
    return _extreme("max", x, dim, keepdim, axis, keepdims, MaxAlongDim, Max, MaxResult)


def min(x, dim=None, keepdim=False, *, axis=None, keepdims=None):  # noqa: A001
    return _extreme("min", x, dim, keepdim, axis, keepdims, MinAlongDim, Min, MinResult)


def argextreme(name, a, dim, keepdim):
    """Indices (int64) of the first max / min of array a along dim (None: flattened)."""
    xp = backend.get_array_module(a)
    if dim is None:
        idx = xp.asarray(a.argmax() if name == "max" else a.argmin(), dtype="int64")
        return idx.reshape((1,) * a.ndim) if keepdim else idx
    (d,) = _normalize_axis(dim, a.ndim)
    idx = (a.argmax(axis=d) if name == "max" else a.argmin(axis=d)).astype("int64")
    return xp.expand_dims(idx, d) if keepdim else idx


def argmax(x, dim=None, keepdim=False, *, axis=None, keepdims=None):
    """Index of the first maximum along `dim` (None: into the flattened tensor), an int64
    tensor outside the graph."""
    return x.argmax(dim, keepdim, axis=axis, keepdims=keepdims)


def argmin(x, dim=None, keepdim=False, *, axis=None, keepdims=None):
    return x.argmin(dim, keepdim, axis=axis, keepdims=keepdims)


def var(x, dim=None, *, correction=1, keepdim=False, unbiased=None, axis=None, keepdims=None):
    """Variance over `dim`: sum((x - mean)^2) / (count - correction).

    correction=1 (the default, as torch.var) is the unbiased estimate, correction=0 the
    population variance; `unbiased=False` is the older spelling of correction=0. Built
    from differentiable ops, so its gradient comes from theirs.
    """
    dim, keepdim = resolve_dim("var", dim, keepdim, axis, keepdims)
    if unbiased is not None:
        correction = 1 if unbiased else 0
    axes = _normalize_axis(dim, x.ndim)
    count = 1
    for a in axes:
        count *= x.shape[a]
    centred = x - mean(x, axes, keepdim=True)
    # As torch: a count not above the correction divides by max(0, count - correction).
    return sum(centred * centred, axes, keepdim=keepdim) / float(builtins.max(count - correction, 0))


def std(x, dim=None, *, correction=1, keepdim=False, unbiased=None, axis=None, keepdims=None):
    """Standard deviation: sqrt(var(x, dim, correction=...))."""
    return var(x, dim, correction=correction, keepdim=keepdim, unbiased=unbiased,
               axis=axis, keepdims=keepdims).sqrt()


class Norm2(Function):
    """sqrt(sum(x^2)) over `axis`; its gradient x / norm is taken as 0 where the norm is 0
    (PyTorch's subgradient there; sqrt's own derivative would give 0 / 0 = NaN)."""

    def forward(self, x):
        xp = backend.get_array_module(x)
        self.shape, axes = x.shape, _normalize_axis(self.axis, x.ndim)
        self.kept = _kept_shape(x.shape, axes)
        r = xp.sqrt((x * x).sum(axis=axes, keepdims=True))
        self.x, self.r = x, r
        return r if self.keepdims else r.reshape([n for i, n in enumerate(r.shape) if i not in axes])

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        r = self.r
        safe = xp.where(r > 0, r, 1)
        return gy.reshape(self.kept) * self.x / safe * (r > 0)


def norm(x, p="fro", dim=None, keepdim=False, *, axis=None, keepdims=None):
    """The vector p-norm over `dim` (all dims when None), as torch.norm / torch.linalg.vector_norm.

    p: 2 or "fro" (sqrt of the sum of squares), 1 (sum of |x|), float("inf") (max |x|), or
    any other positive number (sum(|x|^p))^(1/p).
    """
    dim, keepdim = resolve_dim("norm", dim, keepdim, axis, keepdims)
    if p == "fro" or p == 2:
        return Norm2.apply(x, axis=dim, keepdims=keepdim)
    if p == 1:
        return sum(x.abs(), dim, keepdim)
    if p == float("inf"):
        return amax(x.abs(), dim, keepdim)
    if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
        return sum(x.abs() ** float(p), dim, keepdim) ** (1.0 / p)
    raise ValueError(f"norm() supports p = a positive number, float('inf') or 'fro', got p={p!r}.")
