"""Ops that move values around without arithmetic: reshape, transpose/permute, indexing,
concatenation, stacking, expanding and repeating, and moving between devices.

Dims follow PyTorch: `transpose(x, d0, d1)` swaps two dims, `permute(x, *dims)` reorders
all of them (NumPy's `a.transpose(axes)` is `permute` here).
"""
from .. import backend
from ..function import Function, sum_to_shape
from ..tensor import Tensor


def scatter_add(target, index, values):
    """target[index] += values, with repeated indices adding up (np.add.at on both backends)."""
    xp = backend.get_array_module(target)
    if xp.__name__ == "numpy":
        xp.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)
    return target


class Reshape(Function):
    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape(self.shape)

    def backward(self, gy):
        return gy.reshape(self.in_shape)


class Transpose(Function):
    def forward(self, x):
        self.axes = self.axes or tuple(reversed(range(x.ndim)))
        return x.transpose(self.axes)

    def backward(self, gy):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return gy.transpose(inverse)


def _is_basic(index):
    """Basic indexing (ints, slices, None, ...) never repeats an element; integer arrays may."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


class GetItem(Function):
    def forward(self, x):
        self.in_shape, self.dtype = x.shape, x.dtype
        return x[self.index]

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        if _is_basic(self.index):
            gx[self.index] = gy
        else:  # integer-array indexing may pick an element twice: gradients must add
            scatter_add(gx, self.index, gy)
        return gx


class Concatenate(Function):
    def forward(self, *xs):
        xp = backend.get_array_module(*xs)
        self.sizes = [x.shape[self.axis] for x in xs]
        return xp.concatenate(xs, axis=self.axis)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        splits, total = [], 0
        for s in self.sizes[:-1]:
            total += s
            splits.append(total)
        return tuple(xp.split(gy, splits, axis=self.axis))


class Stack(Function):
    def forward(self, *xs):
        return backend.get_array_module(*xs).stack(xs, axis=self.axis)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        return tuple(xp.moveaxis(gy, self.axis, 0))


class ToDevice(Function):
    def forward(self, x):
        self.source = backend.device_of(x)
        return backend.to_device(x, self.device)

    def backward(self, gy):
        return backend.to_device(gy, self.source)

    # Inputs and output live on different devices by design, so skip the device check.
    def __call__(self, x):
        requires = x.requires_grad
        from ..grad_mode import is_grad_enabled
        out = Tensor._wrap(self.forward(x.data))
        if requires and is_grad_enabled():
            self.needs_input_grad = (True,)
            self.parents = (x if x._node is None else x._node,)
            out.requires_grad, out._node = True, self
        return out


def _unwrap_index(index):
    """Tensors used as indices become their arrays."""
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    return index.data if isinstance(index, Tensor) else index


def getitem(x, index):
    return GetItem.apply(x, index=_unwrap_index(index))


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    size = x.data.size if isinstance(x, Tensor) else x.size
    known = 1
    for s in shape:
        known *= s if s != -1 else 1
    if (-1 not in shape and known != size) or (-1 in shape and (known == 0 or size % known)):
        raise ValueError(f"cannot reshape a tensor of shape {tuple(x.shape)} ({size} elements) "
                         f"into shape {tuple(shape)}.")
    return Reshape.apply(x, shape=tuple(shape))


def flatten(x, start_dim=0, end_dim=-1):
    shape = tuple(x.shape)
    start, end = start_dim % len(shape), end_dim % len(shape)
    return reshape(x, *(shape[:start] + (-1,) + shape[end + 1:]))


def _dim(name, d, ndim):
    if isinstance(d, bool) or not isinstance(d, int) or not -ndim <= d < max(ndim, 1):
        raise ValueError(f"{name}() got dim {d!r} for a tensor with {ndim} dimensions; "
                         f"use an int in [{-ndim}, {max(ndim, 1) - 1}].")
    return d % max(ndim, 1)


def permute(x, *dims):
    """Reorder the dims: output dim i is input dim dims[i] (torch.permute). A view."""
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if sorted(_dim("permute", d, x.ndim) for d in dims) != list(range(x.ndim)):
        raise ValueError(f"permute() dims {dims} are not a permutation of the {x.ndim} "
                         "dimensions.")
    return Transpose.apply(x, axes=tuple(d % x.ndim for d in dims) or None)


def transpose(x, dim0, dim1):
    """Swap dims dim0 and dim1 (torch.transpose); for a full reordering use permute()."""
    order = list(range(x.ndim))
    d0, d1 = _dim("transpose", dim0, x.ndim), _dim("transpose", dim1, x.ndim)
    order[d0], order[d1] = order[d1], order[d0]
    return Transpose.apply(x, axes=tuple(order) or None)


def _dim_alias(name, dim, axis):
    if axis is not None:
        if dim != 0:
            raise TypeError(f"{name}() got both dim and axis; pass only dim.")
        return axis
    return dim


def cat(tensors, dim=0, *, axis=None):
    """Join tensors along an existing dim (torch.cat); shapes must match elsewhere.
    `axis` is accepted as NumPy's name for dim."""
    axis = _dim_alias("cat", dim, axis)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat() needs at least one tensor.")
    ref = tensors[0].shape
    for t in tensors[1:]:
        if len(t.shape) != len(ref) or any(a != b for i, (a, b) in enumerate(zip(t.shape, ref))
                                            if i != axis % len(ref)):
            raise ValueError(f"cat() along axis {axis} needs equal sizes on the other axes, "
                             f"got shapes {ref} and {tuple(t.shape)}.")
    return Concatenate.apply(*tensors, axis=axis)


def stack(tensors, dim=0, *, axis=None):
    """Join equally shaped tensors along a new dim (torch.stack)."""
    axis = _dim_alias("stack", dim, axis)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack() needs at least one tensor.")
    if any(tuple(t.shape) != tuple(tensors[0].shape) for t in tensors):
        raise ValueError("stack() needs tensors of one shape, got "
                         f"{sorted({tuple(t.shape) for t in tensors})}.")
    return Stack.apply(*tensors, axis=axis)


def to_device_op(x, device):
    return ToDevice(device=backend.normalize_device(device))(x)


class Copy(Function):
    """A differentiable copy (clone / contiguous): C-contiguous, never shares memory."""
    def forward(self, x):
        return backend.get_array_module(x).array(x, copy=True, order="C")

    def backward(self, gy):
        return gy


def clone(x):
    return Copy.apply(x)


def contiguous(x):
    """x itself when its array is C-contiguous already, else a contiguous copy."""
    return x if x.data.flags.c_contiguous else Copy.apply(x)


class Expand(Function):
    """Broadcast to a bigger shape without copying; backward sums the copies back."""
    def forward(self, x):
        self.in_shape = x.shape
        return backend.get_array_module(x).broadcast_to(x, self.shape)

    def backward(self, gy):
        return sum_to_shape(gy, self.in_shape)


def expand(x, *sizes):
    """x broadcast to `sizes` (-1 keeps a dim's size; new dims go in front), as torch.expand.

    The result is a read-only view: only dims of length 1 can grow."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    shape = tuple(x.shape)
    if len(sizes) < len(shape):
        raise ValueError(f"expand() got {len(sizes)} sizes for a tensor with {len(shape)} dims; "
                         "give at least one size per dim.")
    lead = len(sizes) - len(shape)
    out = []
    for i, n in enumerate(sizes):
        old = shape[i - lead] if i >= lead else None
        if n == -1:
            if old is None:
                raise ValueError("expand() cannot use -1 for a new leading dim; give its size.")
            n = old
        if old is not None and old != 1 and old != n:
            raise ValueError(f"expand() cannot grow dim {i - lead} of size {old} to {n}; only "
                             "dims of size 1 can be expanded (use repeat() to copy).")
        out.append(n)
    return Expand.apply(x, shape=tuple(out))


class Repeat(Function):
    """Tile x `reps` times along each dim (torch.repeat = numpy.tile with reps per dim)."""
    def forward(self, x):
        self.in_shape = (1,) * (len(self.reps) - x.ndim) + x.shape
        return backend.get_array_module(x).tile(x.reshape(self.in_shape), self.reps)

    def backward(self, gy):
        # Output dim i holds reps[i] copies of in_shape[i]: split each dim into (copy, value)
        # and sum over the copies.
        split = []
        for r, n in zip(self.reps, self.in_shape):
            split += [r, n]
        g = gy.reshape(split).sum(axis=tuple(range(0, len(split), 2)))
        return g.reshape(self.x_shape)


def repeat(x, *reps):
    """x copied reps[i] times along dim i; len(reps) >= x.ndim (extra reps add leading dims)."""
    if len(reps) == 1 and isinstance(reps[0], (tuple, list)):
        reps = tuple(reps[0])
    if len(reps) < x.ndim:
        raise ValueError(f"repeat() got {len(reps)} counts for a tensor with {x.ndim} dims; give "
                         "one per dim (torch.repeat), e.g. repeat(1, 2) for 2-D.")
    if any(int(r) < 0 for r in reps):
        raise ValueError(f"repeat() counts must be non-negative, got {tuple(reps)}.")
    return Repeat.apply(x, reps=tuple(int(r) for r in reps), x_shape=tuple(x.shape))


def _index_array(index, like, name):
    idx = index.data if isinstance(index, Tensor) else index
    xp = backend.get_array_module(like)
    idx = xp.asarray(idx)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{name}() needs an integer index, got dtype {idx.dtype}; "
                        "convert it with .long().")
    return idx


class Gather(Function):
    """out[i][j][k] = x[i][index[i][j][k]][k] for dim=1 (numpy.take_along_axis)."""
    def forward(self, x):
        self.shape = x.shape
        return backend.get_array_module(x).take_along_axis(x, self.index, axis=self.dim)

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        gx = xp.zeros(self.shape, dtype=gy.dtype)
        # An index may name one element twice: the gradients add (np.add.at semantics).
        scatter_add(gx, _along_axis_positions(self.index, self.dim), gy)
        return gx


def _along_axis_positions(index, dim):
    """The full integer index tuple that take_along_axis(a, index, dim) reads."""
    xp = backend.get_array_module(index)
    # One arange per dim, shaped to broadcast along its own dim only (an open grid).
    grids = [xp.arange(n).reshape((1,) * d + (n,) + (1,) * (index.ndim - d - 1))
             for d, n in enumerate(index.shape)]
    grids[dim] = index
    return tuple(grids)


def _check_index_shape(name, x, index, dim, src_shape=None):
    if index.ndim != x.ndim:
        raise ValueError(f"{name}() needs an index with as many dims as the input ({x.ndim}), "
                         f"got shape {tuple(index.shape)}.")
    for d, (i, n) in enumerate(zip(index.shape, x.shape)):
        if d != dim and i > n:
            raise ValueError(f"{name}() index shape {tuple(index.shape)} is larger than the input "
                             f"shape {tuple(x.shape)} in dim {d}.")
    if index.size and (int(index.min()) < -x.shape[dim] or int(index.max()) >= x.shape[dim]):
        raise ValueError(f"{name}() index holds values outside [0, {x.shape[dim]}) for dim {dim}.")


def gather(x, dim, index):
    """Pick values along `dim` (torch.gather): out has index's shape. index: int64, x.ndim dims."""
    dim = _dim("gather", dim, x.ndim)
    idx = _index_array(index, x.data if isinstance(x, Tensor) else x, "gather")
    _check_index_shape("gather", x, idx, dim)
    # take_along_axis wants index's shape to match except along dim; PyTorch allows smaller
    # sizes elsewhere, so read the leading block of x first.
    if any(i != n for d, (i, n) in enumerate(zip(idx.shape, x.shape)) if d != dim):
        x = getitem(x, tuple(slice(None) if d == dim else slice(0, i)
                             for d, i in enumerate(idx.shape)))
    return Gather.apply(x, index=idx % x.shape[dim], dim=dim)


class Scatter(Function):
    """out = x with out[..., index, ...] = src along dim (torch.scatter, src a tensor)."""
    def forward(self, x, src):
        out = x.copy()
        self.positions = _along_axis_positions(self.index, self.dim)
        out[self.positions] = src[tuple(slice(0, n) for n in self.index.shape)]
        self.src_shape = src.shape
        return out

    def backward(self, gy):
        xp = backend.get_array_module(gy)
        need_x, need_src = self.needs_input_grad
        gx = gsrc = None
        if need_x:                     # overwritten places do not reach the output
            gx = gy.copy()
            gx[self.positions] = 0
        if need_src:
            gsrc = xp.zeros(self.src_shape, dtype=gy.dtype)
            gsrc[tuple(slice(0, n) for n in self.index.shape)] = gy[self.positions]
        return gx, gsrc


def scatter(x, dim, index, src=None, *, value=None):
    """A copy of x with the values of src (or the number `value`) written along `dim` at `index`.

    out[i][index[i][j]] = src[i][j] for dim=1 (torch.scatter). With repeated indices the last
    write wins on the CPU; PyTorch leaves that order undefined, so avoid it.
    """
    if (src is None) == (value is None):
        raise TypeError("scatter() needs exactly one of src (a tensor) and value (a number).")
    dim = _dim("scatter", dim, x.ndim)
    idx = _index_array(index, x.data if isinstance(x, Tensor) else x, "scatter")
    _check_index_shape("scatter", x, idx, dim)
    if src is None or not hasattr(src, "shape"):
        v = value if src is None else src
        xp = backend.get_array_module(x.data if isinstance(x, Tensor) else x)
        src = xp.full(idx.shape, v, dtype=x.dtype)
    elif any(i > n for i, n in zip(idx.shape, src.shape)):
        raise ValueError(f"scatter() index shape {tuple(idx.shape)} is larger than src's shape "
                         f"{tuple(src.shape)}.")
    return Scatter.apply(x, src, index=idx % x.shape[dim], dim=dim)


def split(x, split_size_or_sections, dim=0):
    """Pieces of x along `dim` (torch.split): an int gives pieces of that size (the last may be
    smaller), a list gives the sizes of each piece."""
    dim = _dim("split", dim, x.ndim)
    n = x.shape[dim]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        if step <= 0:
            raise ValueError(f"split() needs a positive piece size, got {step}.")
        sizes = [min(step, n - s) for s in range(0, n, step)] or [0]
    else:
        sizes = [int(s) for s in split_size_or_sections]
        if sum(sizes) != n:
            raise ValueError(f"split() sizes {sizes} add up to {sum(sizes)}, but dim {dim} has "
                             f"size {n}.")
    pieces, start = [], 0
    for size in sizes:
        pieces.append(getitem(x, (slice(None),) * dim + (slice(start, start + size),)))
        start += size
    return tuple(pieces)


def chunk(x, chunks, dim=0):
    """x split into `chunks` pieces of ceil(size / chunks) along dim (fewer if it runs out)."""
    if chunks <= 0:
        raise ValueError(f"chunk() needs a positive number of chunks, got {chunks}.")
    n = x.shape[_dim("chunk", dim, x.ndim)]
    return split(x, max(-(-n // chunks), 1), dim)
