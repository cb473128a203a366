"""`Function`: one differentiable operation, forward and backward side by side.

A subclass implements

    forward(self, *arrays) -> array          # plain ndarrays in, ndarray out
    backward(self, gy)     -> grad or tuple  # one gradient per forward input (None allowed)

and saves on `self` only what backward needs. `MyOp.apply(x, w, stride=2)` builds the op
with its parameters, runs forward on the tensors' arrays and, when a gradient is wanted,
links the output tensor to the op so that `Tensor.backward()` can find it.
"""
from . import backend
from .grad_mode import is_grad_enabled
from .tensor import Tensor


class Function:
    freed = False
    parents = ()
    # needs_input_grad[i]: whether input i wants a gradient; forward can use it to skip
    # saving what a backward would need.
    needs_input_grad = ()

    def __init__(self, **params):
        self.__dict__.update(params)

    def forward(self, *xs):
        raise NotImplementedError

    def backward(self, gy):
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs, **params):
        return cls(**params)(*inputs)

    def __call__(self, *inputs):
        arrays, device = [], None
        requires_grad = False
        for x in inputs:
            a = x.data if isinstance(x, Tensor) else x
            if a is not None and hasattr(a, "shape"):
                d = backend.device_of(a)
                if device is None:
                    device = d
                elif d != device:
                    raise RuntimeError(f"{type(self).__name__} got inputs on two devices, "
                                       f"'{device}' and '{d}'; move them to one device with "
                                       ".to('cpu') or .to('gpu').")
            requires_grad |= isinstance(x, Tensor) and x.requires_grad
            arrays.append(a)
        requires_grad = requires_grad and is_grad_enabled()
        if requires_grad:
            self.needs_input_grad = tuple(isinstance(x, Tensor) and x.requires_grad for x in inputs)
        y = self.forward(*arrays)
        out = Tensor._wrap(y)
        if requires_grad:
            # Parents: the leaf tensor itself (its .grad is filled), the node that made a
            # non-leaf tensor, or None for inputs that need no gradient.
            self.parents = tuple(
                (x if x._node is None else x._node) if isinstance(x, Tensor) and x.requires_grad
                else None for x in inputs)
            out.requires_grad = True
            out._node = self
        return out

    def release(self):
        """Drop everything saved for backward; called after backward unless retain_graph."""
        self.__dict__.clear()
        self.freed = True

    def __repr__(self):
        return f"<{type(self).__name__}>"


def sum_to_shape(g, shape):
    """Undo broadcasting: sum gradient g down to `shape` (the input's shape before broadcasting)."""
    if g.shape == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        i + extra for i, n in enumerate(shape) if n == 1 and g.shape[i + extra] != 1)
    g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)
