"""Ops that move values around without arithmetic: reshape, transpose, indexing,
concatenation, stacking and moving between devices."""
from .. import backend
from ..function import Function
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


def transpose(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    if axes and sorted(a % x.ndim for a in axes) != list(range(x.ndim)):
        raise ValueError(f"transpose() axes {axes} are not a permutation of the {x.ndim} "
                         "dimensions.")
    return Transpose.apply(x, axes=tuple(a % x.ndim for a in axes) or None)


def cat(tensors, axis=0):
    """Join tensors along an existing axis (torch.cat); shapes must match elsewhere."""
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


def stack(tensors, axis=0):
    """Join equally shaped tensors along a new axis (torch.stack)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack() needs at least one tensor.")
    if any(tuple(t.shape) != tuple(tensors[0].shape) for t in tensors):
        raise ValueError("stack() needs tensors of one shape, got "
                         f"{sorted({tuple(t.shape) for t in tensors})}.")
    return Stack.apply(*tensors, axis=axis)


def to_device_op(x, device):
    return ToDevice(device=backend.normalize_device(device))(x)
